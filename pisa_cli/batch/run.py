"""Running a planned batch: the pipeline is built (only when some image can run), the jobs
stream through it to a display, and what happened is summed up (counts, the summary line,
the exit code, the report).

The display, the stop flag and the pipeline factory are arguments: the CLI passes a
progress bar, a flag its signal handlers set, and ``build_run_pipeline``; tests
pass fakes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pisa_cli.batch.display import Display
from pisa_cli.batch.plan import screen
from pisa_cli.batch.runner import FAILED, JobResult, run_jobs
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.manifest import Manifest
from pisa_cli.options import BatchOptions, ModelOptions, UpscaleOptions

log = logging.getLogger(__name__)

INTERRUPTED_EXIT = 130
"""Exit code after Ctrl-C, as shells expect (128 + SIGINT)."""


PipelineFactory = Callable[[ModelOptions, UpscaleOptions], Any]
"""Builds a run's pipeline from its model and upscale options (may raise PisaError)."""


def build_run_pipeline(model: ModelOptions, options: UpscaleOptions):
    """The real factory: ``core.loading.build`` of the run's PipelineSpec."""
    from pisa_cli.core.loading import PipelineSpec, build

    return build(PipelineSpec.for_run(model, options))


@dataclass
class Outcome:
    """Everything the summary, the report and the exit code are made of."""

    results: list = field(default_factory=list)
    failed_early: int = 0
    """Missing inputs and inputs that cannot be taken (no result of their own)."""
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
    shard: str = ""
    """K/N when this process ran share K of N (--shard), else empty."""
    made_folder: Path | None = None
    """The topmost folder this run created for the output (-o or a parent of it): removed
    again, with the empty folders in it, if the run wrote nothing there."""


@dataclass(frozen=True)
class Prepared:
    """A batch ready to stream: its pipeline (None when no image can run) and the jobs
    the header screen refused before the first that can."""

    pipeline: Any
    refused: list[tuple[Job, str]]


def prepare(
    jobs: list[Job],
    model: ModelOptions,
    options: UpscaleOptions,
    batch: BatchOptions,
    load: PipelineFactory = build_run_pipeline,
) -> Prepared:
    """Build the pipeline, unless no image header passes the check (``plan.screen``:
    unreadable, not images, too large): then every image fails at once, without a model.
    Raises the factory's PisaError."""
    runnable, refused = screen(jobs, options, batch.max_pixels)
    if not runnable:
        return Prepared(None, refused)
    pipeline = load(model, options)
    pipeline.stages(options)  # timesteps and passes: refused here, not once per image
    for line in pipeline.describe(options):
        log.info("%s", line)
    models = pipeline.models
    log.info("model ready on %s in %s", models.device, str(models.dtype).removeprefix("torch."))
    return Prepared(pipeline, refused)


@dataclass(frozen=True)
class StreamSpec:
    """What a batch streams: its jobs, why each runs, what is done to each image, how
    outputs are written, and the manifest that records them."""

    jobs: tuple[Job, ...]
    """The jobs to run, in order."""
    reasons: Mapping[Job, str]
    """Why each job runs (new, settings changed, input changed, --overwrite)."""
    options: UpscaleOptions
    batch: BatchOptions
    manifest: Manifest | None = None
    """Records every output written (None: nothing recorded)."""


def stream(
    spec: StreamSpec,
    prepared: Prepared,
    outcome: Outcome,
    *,
    display: Display,
    stop: threading.Event,
) -> None:
    """Run ``spec``'s jobs (all failed at once when there is no pipeline), showing each
    result and collecting it into ``outcome``. Setting ``stop`` ends the run after the
    current image; a KeyboardInterrupt abandons it; what finished is written and kept
    either way."""
    start = time.perf_counter()
    if prepared.pipeline is None:
        results: Iterator[JobResult] = _refused(prepared.refused)
    else:
        results = run_jobs(
            prepared.pipeline, spec.jobs, spec.options, spec.batch, manifest=spec.manifest,
            on_start=display.started, stop=stop,
        )  # fmt: skip
    try:
        collect(results, spec.reasons, outcome, len(spec.jobs), display=display, stop=stop)
    finally:
        if spec.manifest is not None:
            spec.manifest.close()  # object storage gathers this run's records into one part
    outcome.run_seconds = time.perf_counter() - start


def collect(
    results: Iterator[JobResult],
    reasons: dict[Job, str],
    outcome: Outcome,
    total: int,
    *,
    display: Display,
    stop: threading.Event,
) -> None:
    """Show each of ``results`` (of ``total`` jobs) and add it to ``outcome``, whoever ran
    it (this process, or Ray's workers). A KeyboardInterrupt sets ``stop`` and the results
    that still come are taken: the runner yields what it finishes, then ends."""
    processed = 0
    while True:
        try:
            for result in results:
                result.reason = reasons.get(result.job, "")
                display.finished(result)
                outcome.results.append(result)
                processed += 1
            break
        except KeyboardInterrupt:
            stop.set()
    outcome.interrupted = stop.is_set()
    outcome.not_done = total - processed


def _refused(refused: list[tuple[Job, str]]) -> Iterator[JobResult]:
    for job, error in refused:
        yield JobResult(job=job, status=FAILED, error=error)


@dataclass(frozen=True)
class Summary:
    """The end of a run: counts, the summary's words after the counts, the exit code."""

    counts: Counter
    extra: str
    exit_code: int


def summarize(outcome: Outcome) -> Summary:
    """Counts of done, skipped and failed (missing inputs too), what else to say, and the
    exit code: 130 when interrupted, 1 when anything failed, else 0."""
    counts = Counter(result.status for result in outcome.results)
    counts["failed"] += outcome.failed_early
    extra = outcome.extra
    if outcome.interrupted:
        extra += f"; stopped, {outcome.not_done} not done (run again to resume)"
    code = 1 if counts["failed"] else 0
    if outcome.interrupted:
        code = INTERRUPTED_EXIT
    return Summary(counts, extra, code)


def write_run_report(report: Path, outcome: Outcome, counts: Counter) -> str | None:
    """Write ``--report`` (``counts``: the summary's); the error line when it cannot be
    written, else None."""
    from pisa_cli.batch.report import write_report

    totals = {
        "done": counts["done"],
        "skipped": counts["skipped"],
        "failed": counts["failed"],
        "not_done": outcome.not_done,
        "interrupted": outcome.interrupted,
        "seconds": round(outcome.seconds, 3),
    }
    if outcome.shard:
        totals["shard"] = outcome.shard
    try:
        write_report(report, outcome.results, totals, outcome.settings)
    except OSError as error:
        return f"{report}: cannot write the report ({error.strerror or error})"
    return None
