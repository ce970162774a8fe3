"""The steps of the commands that speak to the user, shared by one process and the ranks
of several: the pipeline factory, warnings on unusual settings, what discovery found,
plan (with every message), prepare the output folder, run with a display, finish
(summary line, report, exit code)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import typer

from pisa_cli.cli import common, spec
from pisa_cli.cli.progress import display, summary
from pisa_cli.cli.signals import stop_on_signals
from pisa_cli.errors import PisaError
from pisa_cli.options import UpscaleOptions

if TYPE_CHECKING:  # the batch imports torch: only when a command runs, not for --help
    from pisa_cli.batch.plan import RunPlan
    from pisa_cli.batch.run import Outcome, Summary


def pipeline_factory(context: typer.Context | None):
    """How this command builds its pipeline: ``obj["pipeline_factory"]`` when the caller
    gave one (``app(obj=...)``; tests pass fakes), else ``core.loading``'s."""
    obj = context.obj if context is not None else None
    if isinstance(obj, dict) and obj.get("pipeline_factory") is not None:
        return obj["pipeline_factory"]
    from pisa_cli.batch.run import build_run_pipeline

    return build_run_pipeline


def warn_unusual(
    options: UpscaleOptions, weights: str, lambdas: list[tuple[str, float]] | None = None
) -> None:
    """One warning each for settings that run but leave what the model was trained for:
    a --scale other than the family's (``weights`` picks it), negative lambdas
    (``lambdas`` overrides the options' own)."""
    from pisa_cli.core.families import family_of

    try:
        trained = family_of(weights).trained_scale
    except PisaError:  # the load says what is wrong with the weights
        trained = None
    if trained is not None and options.scale != trained:
        common.say(
            f"warning: --scale {options.scale}: the model is trained for x{trained}; other "
            "factors run but are untested",
            err=True,
        )
    if lambdas is None:
        lambdas = [("--lambda-pix", options.lambda_pix), ("--lambda-sem", options.lambda_sem)]
    negative = [f"{name} {value:g}" for name, value in lambdas if value < 0]
    if negative:
        common.say(
            f"warning: {', '.join(negative)}: negative strengths push away from the "
            "LoRA's result; they run but are outside what the model was tuned for",
            err=True,
        )


def say_discovery(found) -> int:
    """Say what the inputs held that cannot run (missing, unreadable, not regular files,
    outputs outside -o: errors) and the folder loops left out (warnings); return how many
    inputs failed this way."""
    for missing in found.missing:
        common.say(f"error: {missing}: no such file or folder", err=True)
    for line in found.unreadable:
        common.say(f"error: {line}", err=True)
    for line in found.loops:
        common.say(f"warning: {line}; not searched again", err=True)
    return len(found.missing) + len(found.unreadable)


def plan(run: spec.UpscaleSpec) -> tuple[RunPlan, Outcome] | None:
    """The run's plan and its outcome so far (conflicts, skipped), with every message said;
    None after a dry run. Exits when there is nothing to upscale or the weights are
    missing."""
    from pisa_cli.batch.plan import decide, find_jobs
    from pisa_cli.batch.run import Outcome

    planned = find_jobs(list(run.inputs), run.output, run.batch, run.shard)
    found = planned.found
    say_discovery(found)
    for conflict in planned.conflicts:
        common.say(f"error: {conflict.error}", err=True)
    if not planned.listed:
        common.say("error: no images to upscale in the given inputs", err=True)
        raise typer.Exit(1)
    if run.dry_run:  # exits as the run would: 1 when any input would fail
        refused = _print_plans(run, found.jobs)
        if refused or planned.failed_early or planned.conflicts:
            raise typer.Exit(1)
        return None
    try:
        decide(planned, run.model, run.options, run.batch)
    except PisaError as error:
        raise common.fail(error) from None
    _say_skipped(planned, run.quiet)
    outcome = Outcome(failed_early=planned.failed_early, settings=planned.settings)
    outcome.results += planned.conflicts + planned.skipped
    outcome.extra = _extra(found)
    outcome.shard = "" if run.shard.whole else str(run.shard)
    return planned, outcome


def prepare_output(run: spec.UpscaleSpec, outcome: Outcome) -> None:
    """Create and probe the output folder before the model loads (exit 1 when it cannot
    be written, or its manifest is not a file we can append to)."""
    from pisa_cli.batch.plan import OutputFolderError, make_output_folder
    from pisa_cli.imaging.manifest import manifest_problem
    from pisa_cli.imaging.objects import ObjectPath

    try:
        problem = None if isinstance(run.output, ObjectPath) else manifest_problem(run.output)
        if problem is not None:
            raise OutputFolderError(problem)
        outcome.made_folder = make_output_folder(run.output, run.batch)
    except PisaError as error:
        raise common.fail(error) from None


def execute(run, planned: RunPlan, jobs, outcome: Outcome, load, stop) -> None:
    """Build the pipeline (exit on failure) and stream ``jobs`` with a display, Ctrl-C
    setting ``stop``."""
    from pisa_cli.batch.plan import remove_empty_folder
    from pisa_cli.batch.run import StreamSpec, prepare, stream

    try:
        prepared = prepare(jobs, run.model, run.options, run.batch, load)
    except PisaError as error:
        if outcome.made_folder is not None:  # a failed load leaves no folder it made
            remove_empty_folder(outcome.made_folder)
        raise common.fail(error) from None
    with display(len(jobs), run.quiet) as shown, stop_on_signals(stop, shown.warn):
        spec = StreamSpec(
            jobs=tuple(jobs), reasons=planned.reasons, options=run.options, batch=run.batch,
            manifest=planned.manifest,
        )  # fmt: skip
        stream(spec, prepared, outcome, display=shown, stop=stop)


def execute_on_ray(run, planned: RunPlan, outcome: Outcome, load, stop) -> None:
    """``execute`` on Ray (--ray, --devices): the same display, fed by the workers'
    results; no Ray at all when no image header passes the screen."""
    from pisa_cli.batch.distributed import parse_devices
    from pisa_cli.batch.plan import screen
    from pisa_cli.batch.ray_run import RayTarget, run_on_ray
    from pisa_cli.batch.run import StreamSpec

    jobs = planned.to_run
    if not screen(jobs, run.options, run.batch.max_pixels)[0]:
        execute(run, planned, jobs, outcome, load, stop)  # every image fails, no model
        return
    devices = tuple(parse_devices(run.devices)) if run.devices else ()
    target = RayTarget(run.ray or "local", devices)
    spec = StreamSpec(
        jobs=tuple(jobs), reasons=planned.reasons, options=run.options, batch=run.batch,
        manifest=planned.manifest,
    )  # fmt: skip
    with display(len(jobs), run.quiet) as shown, stop_on_signals(stop, shown.warn):
        try:
            run_on_ray(spec, run.model, load, target, outcome, display=shown, stop=stop)
        except PisaError as error:
            from pisa_cli.batch.plan import remove_empty_folder

            if outcome.made_folder is not None:  # no cluster, no model: no folder left
                remove_empty_folder(outcome.made_folder)
            raise common.fail(error) from None


def _say_skipped(planned: RunPlan, quiet: bool) -> None:
    if quiet:
        return
    skipped = planned.skipped
    current = sum(1 for result in skipped if result.reason == "up to date")
    if current:
        common.say(f"{current} outputs up to date, skipped (--overwrite redoes them)", err=True)
    for result in skipped:
        if result.reason != "up to date":
            common.say(f"warning: {result.reason}", err=True)
    counts = Counter(planned.reasons[job] for job in planned.to_run)
    for reason in ("settings changed", "input changed"):
        if counts[reason]:
            common.say(f"{counts[reason]} outputs will be redone: {reason}", err=True)


def _extra(found) -> str:
    extra = ""
    if found.skipped:
        extra += f"; {len(found.skipped)} non-image files ignored"
    if found.unsearched:
        extra += f"; {len(found.unsearched)} sub-folders not searched (--recursive)"
    return extra


def finish(outcome: Outcome, run: spec.UpscaleSpec) -> None:
    """The summary line, the report, an empty output folder this run made removed, and the
    exit code."""
    from pisa_cli.batch.plan import remove_empty_folder
    from pisa_cli.batch.run import summarize, write_run_report

    if outcome.made_folder is not None:
        remove_empty_folder(outcome.made_folder)
    result: Summary = summarize(outcome)
    done = result.counts["done"]
    speed = done / outcome.run_seconds if done and outcome.run_seconds > 0 else 0
    rate = f" ({speed:.2f} img/s)" if speed else ""
    line = summary(result.counts, result.extra) + f" in {outcome.seconds:.1f} s{rate}"
    common.say(line, err=True)
    code = result.exit_code
    if run.report is not None:
        error = write_run_report(run.shard.report_path(run.report), outcome, result.counts)
        if error is not None:
            common.say(f"error: {error}", err=True)
            code = code or 1
    if code:
        raise typer.Exit(code)


def _print_plans(run: spec.UpscaleSpec, jobs: list) -> int:
    """--dry-run: each image's plan, from its header and the free memory; no model loaded.
    Returns how many images the run would refuse."""
    from pisa_cli.batch.families import describe_families
    from pisa_cli.batch.plan import dry_run

    refused = 0
    try:
        for line in describe_families(run.options, run.model):
            common.say(line)
        for job, plans in dry_run(jobs, run.options, run.model, run.batch.max_pixels):
            if isinstance(plans, str):
                common.say(f"error: {plans}", err=True)
                refused += 1
                continue
            common.say(f"{job.source} -> {job.output}")
            for index, plan_ in enumerate(plans):
                common.say_lines(("second pass: " if index else "") + plan_.describe())
    except PisaError as error:
        raise common.fail(error) from None
    return refused
