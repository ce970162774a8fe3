"""Running a planned batch: the pipeline is built (only when some image can run), the jobs
stream through it to a display, and what happened is summed up (counts, the summary line,
the exit code, the report).

The display, the stop flag and the pipeline factory are arguments: the CLI passes a
progress bar, a flag its signal handlers set, and ``core.loading.load_pipeline``; tests
pass fakes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pisa_cli.batch.plan import screen
from pisa_cli.batch.runner import FAILED, JobResult, run_jobs
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.manifest import Manifest
from pisa_cli.options import BatchOptions, ModelOptions, UpscaleOptions

log = logging.getLogger(__name__)

INTERRUPTED_EXIT = 130
"""Exit code after Ctrl-C, as shells expect (128 + SIGINT)."""


class Display(Protocol):
    """What the batch tells as it goes (the CLI's progress bar, plain lines, or nothing)."""

    def started(self, job: Job) -> None: ...

    def finished(self, result: JobResult) -> None: ...

    def warn(self, text: str) -> None: ...

    def ranks(self, progress: list) -> None: ...


PipelineFactory = Callable[[ModelOptions, UpscaleOptions], Any]
"""Builds a run's pipeline from its model and upscale options (may raise PisaError)."""


def load_pipeline(model: ModelOptions, options: UpscaleOptions):
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
    lost_ranks: list[int] = field(default_factory=list)
    """Ranks of a multi-process run that stopped without reporting (their images: not_done)."""
    ranks: int = 1
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
    load: PipelineFactory = load_pipeline,
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
    dtype_name = str(pipeline.dtype).removeprefix("torch.")
    log.info("model ready on %s in %s", pipeline.device, dtype_name)
    return Prepared(pipeline, refused)


Watch = Callable[[Display, Callable[[], tuple[int, float]]], AbstractContextManager]
"""Around a run of several ranks: given the display and a function returning (images
finished, seconds since the first started), publishes and shows every rank's progress."""


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
    watch: Watch | None = None,
) -> None:
    """Run ``spec``'s jobs (all failed at once when there is no pipeline), showing each
    result and collecting it into ``outcome``. Setting ``stop`` ends the run after the
    current image; a KeyboardInterrupt abandons it; what finished is written and kept
    either way."""
    jobs, reasons = spec.jobs, spec.reasons
    processed, start = 0, time.perf_counter()

    def progress() -> tuple[int, float]:
        return processed, time.perf_counter() - start

    with watch(display, progress) if watch else nullcontext():
        if prepared.pipeline is None:
            results: Iterator[JobResult] = _refused(prepared.refused)
        else:
            results = run_jobs(
                prepared.pipeline, jobs, spec.options, spec.batch, manifest=spec.manifest,
                on_start=display.started, stop=stop,
            )  # fmt: skip
        while True:
            try:
                for result in results:
                    result.reason = reasons.get(result.job, "")
                    display.finished(result)
                    outcome.results.append(result)
                    processed += 1
                break
            except KeyboardInterrupt:
                stop.set()  # keep draining: the runner yields what it finishes, then ends
    outcome.interrupted = stop.is_set()
    outcome.not_done = len(jobs) - processed
    outcome.run_seconds = time.perf_counter() - start


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
    exit code: 130 when interrupted, 1 when anything failed (or a rank was lost), else 0."""
    counts = Counter(result.status for result in outcome.results)
    counts["failed"] += outcome.failed_early
    extra = outcome.extra
    if outcome.lost_ranks:
        names = ", ".join(map(str, outcome.lost_ranks))
        extra += f"; rank {names} stopped without reporting"
    if outcome.interrupted or outcome.lost_ranks:
        extra += f"; stopped, {outcome.not_done} not done (run again to resume)"
    code = 1 if counts["failed"] or outcome.lost_ranks else 0
    if outcome.interrupted:
        code = INTERRUPTED_EXIT
    return Summary(counts, extra, code)


def write_report(report: Path, outcome: Outcome, counts: Counter) -> str | None:
    """Write ``--report`` (``counts``: the summary's); the error line when it cannot be
    written, else None."""
    from pisa_cli.batch.report import write_report as write

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
        write(report, outcome.results, totals, outcome.settings)
    except OSError as error:
        return f"{report}: cannot write the report ({error.strerror or error})"
    return None
