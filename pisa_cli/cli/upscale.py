"""`pisa upscale`: find the inputs, skip what is up to date, load the model once, stream
every other input through it, report, exit code."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import typer

from pisa_cli.cli import common
from pisa_cli.cli.progress import display, summary
from pisa_cli.errors import PisaError
from pisa_cli.options import DEFAULT_MAX_PIXELS, BatchOptions, ModelOptions, UpscaleOptions

INTERRUPTED_EXIT = 130
"""Exit code after Ctrl-C, as shells expect (128 + SIGINT)."""
CLI_ONLY = ("inputs", "output", "quiet", "verbose", "dry_run", "report", "devices")


@dataclass
class Outcome:
    """Everything the summary, the report and the exit code are made of."""

    results: list = field(default_factory=list)
    failed_early: int = 0
    """Missing inputs and outputs that would replace their input (no result of their own)."""
    not_done: int = 0
    """Images left when the run was stopped."""
    interrupted: bool = False
    seconds: float = 0.0
    """The whole command."""
    run_seconds: float = 0.0
    """From the first image into the model to the last written (the model's loading aside)."""
    extra: str = ""
    """The end of the summary line (files ignored, sub-folders not searched)."""
    settings: dict = field(default_factory=dict)
    lost_ranks: list[int] = field(default_factory=list)
    """Ranks of a multi-process run that stopped without reporting (their images: not_done)."""
    ranks: int = 1


def upscale_command(
    context: typer.Context,
    inputs: common.Inputs,
    output: common.OutputDir,
    base_model: common.BaseModel = "",
    weights: common.Weights = "",
    scale: common.Scale = 4,
    process_size: common.ProcessSize = 512,
    lambda_pix: common.LambdaPix = 1.0,
    lambda_sem: common.LambdaSem = 1.0,
    color_fix: common.ColorFix = "adain",
    prompt: common.Prompt = "",
    seed: common.Seed = None,
    vae_sample: common.VaeSample = False,
    timestep: common.Timestep = None,
    latent_tile: common.LatentTile = "auto",
    latent_overlap: common.LatentOverlap = "auto",
    vae_encoder_tile: common.VaeEncoderTile = "auto",
    vae_decoder_tile: common.VaeDecoderTile = "auto",
    tile_batch: common.TileBatch = "auto",
    second_pass: common.SecondPass = "none",
    second_pass_weights: common.SecondPassWeights = "",
    second_pass_timestep: common.SecondPassTimestep = None,
    second_pass_prompt: common.SecondPassPrompt = "",
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
    compile: common.Compile = False,
    recursive: common.Recursive = False,
    max_pixels: common.MaxPixels = DEFAULT_MAX_PIXELS,
    format: common.Format = "png",
    quality: common.Quality = 95,
    suffix: common.Suffix = "",
    overwrite: common.Overwrite = False,
    report: common.Report = None,
    devices: common.Devices = "",
    dry_run: common.DryRun = False,
    quiet: common.Quiet = False,
    verbose: common.Verbose = False,
) -> None:
    """Upscale images with PiSA-SR: `pisa upscale photos/ -o upscaled/`.

    The output of photo.jpg is OUTPUT/photo.png, exactly --scale times the input size (2 x
    --scale with --second-pass), with its transparency, grey, 16 bits, ICC profile and EXIF
    kept. Outputs that exist and were
    made with the same settings are skipped, so an interrupted run resumes (Ctrl-C stops
    after the current image; twice abandons it). Exit code 0 when every image worked, 1
    when some failed, 2 for bad options, 3 when the model or weights cannot be loaded, 130
    when interrupted. Under torchrun, accelerate launch or srun (or with --devices) each
    process runs its share of the inputs and rank 0 prints the summary.
    """
    common.setup_logging(quiet, verbose)
    values = dict(locals())
    for name in (*CLI_ONLY, "context"):
        values.pop(name)
    try:
        batch = common.build_batch(values)
        model_options, options = common.build_options(values)
        if report is not None:
            from pisa_cli.report import check_report_path

            check_report_path(report)
        from pisa_cli.cli.ranks import launch_of

        launch = launch_of(devices, model_options, dry_run)
    except PisaError as error:
        raise common.fail(error) from None
    if launch is not None:
        from pisa_cli.cli import ranks

        if isinstance(launch, list):
            ranks.run_devices(launch, context)
        else:
            ranks.upscale_as_rank(
                launch, inputs, output, model_options, options, batch, quiet, report
            )
        return
    outcome = _upscale(inputs, output, model_options, options, batch, dry_run, quiet)
    if outcome is not None:
        finish(outcome, report)


def _upscale(
    inputs: list[Path],
    output: Path,
    model_options: ModelOptions,
    options: UpscaleOptions,
    batch: BatchOptions,
    dry_run: bool,
    quiet: bool,
) -> Outcome | None:
    start = time.perf_counter()
    planned = plan_run(inputs, output, model_options, options, batch, dry_run, quiet)
    if planned is None:
        return None
    outcome, to_run, reasons, manifest = planned
    if to_run:
        prepare_output(output, batch)
        process(to_run, reasons, model_options, options, batch, manifest, quiet, outcome)
    outcome.seconds = time.perf_counter() - start
    return outcome


def plan_run(inputs, output, model_options, options, batch, dry_run: bool, quiet: bool):
    """(outcome so far, jobs to run, why each runs, manifest): discovery, settings and
    resume decisions; None after a dry run. Exits on errors (typer.Exit)."""
    from pisa_cli.imaging.manifest import Manifest

    manifest = Manifest(output)
    found = _discover(inputs, output, batch, manifest)
    if dry_run:
        _print_plans(found.jobs, options, model_options)
        return None
    outcome = Outcome(failed_early=len(found.missing) + len(found.unreadable))
    outcome.results += [_conflict(job) for job in found.conflicts]
    try:
        settings = _settings(model_options, options, batch)
    except PisaError as error:
        raise common.fail(error) from None
    manifest.use_settings(settings)
    from pisa_cli.runner import sort_jobs

    to_run, reasons, skipped = sort_jobs(found.jobs, manifest, batch.overwrite)
    outcome.results += skipped
    _say_skipped(skipped, to_run, reasons, quiet)
    outcome.extra, outcome.settings = _extra(found), settings
    return outcome, to_run, reasons, manifest


def _discover(inputs: list[Path], output: Path, batch: BatchOptions, manifest):
    from pisa_cli.imaging.discover import discover

    found = discover(inputs, output, batch=batch, exclude=manifest.outputs())
    for missing in found.missing:
        typer.echo(f"error: {missing}: no such file or folder", err=True)
    for line in found.unreadable:
        typer.echo(f"error: {line}", err=True)
    for job in found.conflicts:
        typer.echo(f"error: {_conflict(job).error}", err=True)
    if not found.jobs:
        typer.echo("error: no images to upscale in the given inputs", err=True)
        raise typer.Exit(1)
    return found


def _conflict(job):
    """The failed result of a job whose output would replace its input."""
    from pisa_cli.runner import FAILED, JobResult

    error = f"{job.source}: the output would replace the input; use --suffix or another --output"
    return JobResult(job=job, status=FAILED, error=error)


def _settings(model: ModelOptions, options: UpscaleOptions, batch: BatchOptions) -> dict:
    """The manifest's settings: what the outputs depend on (raises WeightsError when the
    weights cannot be found)."""
    from pisa_cli.families import model_identity
    from pisa_cli.runner import run_settings

    return run_settings(options, batch, model_identity(model, options))


def _say_skipped(skipped: list, to_run: list, reasons: dict, quiet: bool) -> None:
    if quiet:
        return
    current = sum(1 for result in skipped if result.reason == "up to date")
    if current:
        typer.echo(f"{current} outputs up to date, skipped (--overwrite redoes them)", err=True)
    for result in skipped:
        if result.reason != "up to date":
            typer.echo(f"warning: {result.reason}", err=True)
    counts = Counter(reasons[job] for job in to_run)
    for reason in ("settings changed", "input changed"):
        if counts[reason]:
            typer.echo(f"{counts[reason]} outputs will be redone: {reason}", err=True)


def _extra(found) -> str:
    extra = ""
    if found.skipped:
        extra += f"; {len(found.skipped)} non-image files ignored"
    if found.unsearched:
        extra += f"; {len(found.unsearched)} sub-folders not searched (--recursive)"
    return extra


def prepare_output(output: Path, batch: BatchOptions) -> None:
    from pisa_cli.fsutil import remove_stale_temp_files

    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        typer.echo(f"error: {output}: cannot create the output folder ({error.strerror})", err=True)
        raise typer.Exit(1) from None
    remove_stale_temp_files(output, recursive=batch.recursive)


def process(
    to_run, reasons, model_options, options, batch, manifest, quiet, outcome, watch=None
) -> None:
    """Load the model, run the jobs with a display, collect results into ``outcome``.

    ``watch(shown, processed)`` (several ranks) returns a context manager around the run;
    ``processed()`` is (images finished, seconds since the first started)."""
    from pisa_cli.loading import load_pipeline
    from pisa_cli.runner import run_jobs

    log = logging.getLogger("pisa_cli")
    try:
        pipeline = load_pipeline(model_options, options=options)
        pipeline.stages(options)  # timesteps and passes: refused here, not once per image
        for line in pipeline.describe(options):
            log.info("%s", line)
    except PisaError as error:
        raise common.fail(error) from None
    dtype_name = str(pipeline.dtype).removeprefix("torch.")
    log.info("model ready on %s in %s", pipeline.device, dtype_name)
    stop = threading.Event()
    processed, start = 0, time.perf_counter()

    def progress() -> tuple[int, float]:
        return processed, time.perf_counter() - start

    with (
        display(len(to_run), quiet) as shown,
        _stop_on_signals(stop, shown.warn),
        watch(shown, progress) if watch else nullcontext(),
    ):
        results = run_jobs(
            pipeline, to_run, options, batch, manifest=manifest, on_start=shown.started, stop=stop
        )
        while True:
            try:
                for result in results:
                    result.reason = reasons.get(result.job, "")
                    shown.finished(result)
                    outcome.results.append(result)
                    processed += 1
                break
            except KeyboardInterrupt:
                stop.set()  # keep draining: the runner yields what it finishes, then ends
    outcome.interrupted = stop.is_set()
    outcome.not_done = len(to_run) - processed
    outcome.run_seconds = time.perf_counter() - start


@contextmanager
def _stop_on_signals(stop: threading.Event, warn) -> Iterator[None]:
    """First Ctrl-C: finish the current image, then stop. Second Ctrl-C or SIGTERM: abandon
    it (KeyboardInterrupt). Finished images are written either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(number: int, frame: object) -> None:
        if number == signal.SIGINT and not stop.is_set():
            stop.set()
            warn("stopping after the current image (Ctrl-C again to abandon it)")
            return
        stop.set()
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, on_signal) for number in stop_signals()}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_signals() -> tuple[int, ...]:
    return (signal.SIGINT, signal.SIGTERM)


def finish(outcome: Outcome, report: Path | None) -> None:
    counts = Counter(result.status for result in outcome.results)
    counts["failed"] += outcome.failed_early
    extra = outcome.extra
    if outcome.lost_ranks:
        names = ", ".join(map(str, outcome.lost_ranks))
        extra += f"; rank {names} stopped without reporting"
    if outcome.interrupted or outcome.lost_ranks:
        extra += f"; stopped, {outcome.not_done} not done (run again to resume)"
    done = counts["done"]
    speed = done / outcome.run_seconds if done and outcome.run_seconds > 0 else 0
    rate = f" ({speed:.2f} img/s)" if speed else ""
    typer.echo(summary(counts, extra) + f" in {outcome.seconds:.1f} s{rate}", err=True)
    report_failed = report is not None and not _write_report(report, outcome, counts)
    code = 1 if counts["failed"] or report_failed or outcome.lost_ranks else 0
    if outcome.interrupted:
        code = INTERRUPTED_EXIT
    if code:
        raise typer.Exit(code)


def _write_report(report: Path, outcome: Outcome, counts: Counter) -> bool:
    from pisa_cli.report import write_report

    totals = {
        "done": counts["done"],
        "skipped": counts["skipped"],
        "failed": counts["failed"],
        "not_done": outcome.not_done,
        "interrupted": outcome.interrupted,
        "seconds": round(outcome.seconds, 3),
    }
    if outcome.ranks > 1:
        totals["ranks"] = outcome.ranks
        totals["lost_ranks"] = outcome.lost_ranks
    try:
        write_report(report, outcome.results, totals, outcome.settings)
    except OSError as error:
        reason = error.strerror or error
        typer.echo(f"error: {report}: cannot write the report ({reason})", err=True)
        return False
    return True


def _print_plans(jobs: list, options, model_options) -> None:
    """--dry-run: each image's plan, from its header and the free memory; no model loaded."""
    from pisa_cli.families import describe_families
    from pisa_cli.runner import dry_run

    try:
        for line in describe_families(options, model_options):
            typer.echo(line)
        for job, plans in dry_run(jobs, options, model_options):
            if isinstance(plans, str):
                typer.echo(f"error: {plans}", err=True)
                continue
            typer.echo(f"{job.source} -> {job.output}")
            for index, plan in enumerate(plans):
                typer.echo(("second pass: " if index else "") + plan.describe())
    except PisaError as error:
        raise common.fail(error) from None
