"""Streams jobs through the pipeline: one result per image, a failing image never stops the rest.

Three stages overlap: a read-ahead thread decodes the next images, the model runs in the
caller's thread, and a write-behind thread composes (alpha, grey, 16 bits), encodes and
saves finished images. Both queues are bounded, so memory does not grow with the folder.

The runner knows nothing of progress bars or terminals: it yields results, in job order,
and the CLI displays them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

from pisa_cli.core.planning import check_pixels
from pisa_cli.errors import describe_error as describe
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.io import read_picture, write_output
from pisa_cli.imaging.manifest import Manifest
from pisa_cli.imaging.modes import Picture, compose
from pisa_cli.imaging.stream import Loaded, WriteBehind, read_ahead
from pisa_cli.options import (
    BatchOptions,
    UpscaleOptions,
)

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
MODEL_STAGES = ("preprocess", "text", "encode", "unet", "decode", "color")
"""Timings of the pipeline (the model's time, as opposed to reading and writing)."""


@dataclass
class JobResult:
    """What happened to one job."""

    job: Job
    status: str
    """done, skipped or failed."""
    error: str = ""
    """One line naming the file and the reason, when failed."""
    reason: str = ""
    """Why it was run (new, settings changed, input changed, --overwrite) or skipped."""
    seconds: float = 0.0
    """Time spent on this image in all stages (stages of different images overlap)."""
    input_size: tuple[int, int] | None = None
    output_size: tuple[int, int] | None = None
    input_mode: str = ""
    """The input's mode (RGB, RGBA, L, I;16, RGB;16 ...)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: read, preprocess, text, encode, unet, decode, color, compose, write."""
    notes: list[str] = field(default_factory=list)
    """What was changed on the way (first frame of an animation, CMYK converted,
    transparency flattened, out-of-memory retries, fp32 redos)."""
    warnings: list[str] = field(default_factory=list)
    """The notes of reading and writing, for the display (the pipeline logs its own)."""

    @property
    def model_seconds(self) -> float:
        return sum(self.timings.get(stage, 0.0) for stage in MODEL_STAGES)


SaveFunction = Callable[..., list[str]]
"""write_output's signature: (pixels, path, quality, before_replace) -> notes."""


@dataclass(frozen=True)
class _Written:
    notes: list[str]
    output_size: tuple[int, int]
    compose_seconds: float
    write_seconds: float


def run_jobs(
    pipeline,
    jobs: Iterable[Job],
    options: UpscaleOptions,
    batch: BatchOptions | None = None,
    *,
    manifest: Manifest | None = None,
    on_start: Callable[[Job], None] | None = None,
    stop: threading.Event | None = None,
    save: SaveFunction = write_output,
) -> Iterator[JobResult]:
    """Upscale each job's source into its output, yielding a result per job, in order.

    ``manifest`` records every output written. ``on_start`` is called (in this thread) as
    an image enters the model. Setting ``stop`` ends the run after the current image; a
    KeyboardInterrupt abandons it. Either way the images already finished are written,
    their results yielded, and nothing partial is left.
    """
    batch = batch or BatchOptions()
    stop = stop or threading.Event()
    read = partial(_read, options=options, max_pixels=batch.max_pixels)
    loads = read_ahead(jobs, read, batch.read_ahead)
    pending: deque[tuple[JobResult, Future | None]] = deque()
    with WriteBehind(batch.write_behind) as writer:
        try:
            for loaded in loads:
                if stop.is_set():
                    break
                result, picture, upscaled = _upscale(pipeline, loaded, options, on_start)
                future = None
                if picture is not None:
                    save_one = partial(_save, save, loaded.item, picture, batch.quality, manifest)
                    future = writer.submit(save_one, upscaled)
                pending.append((result, future))
                yield from _finished(pending)
        except KeyboardInterrupt:
            stop.set()  # the image in the model is abandoned; finished ones are still written
        finally:
            loads.close()
        yield from _finished(pending, wait=True)


def _read(job: Job, options: UpscaleOptions, max_pixels: int) -> Picture:
    picture = read_picture(job.source, max_pixels)
    check_pixels(job.source, picture.size, options, max_pixels)
    return picture


def _upscale(pipeline, loaded: Loaded, options: UpscaleOptions, on_start):
    """(result, picture, upscaled colour): picture is None when the image failed."""
    job: Job = loaded.item
    result = JobResult(job=job, status=FAILED, timings={"read": loaded.seconds})
    if loaded.error is not None:
        result.error = describe_error(job, loaded.error)
        return _closed(result), None, None
    picture: Picture = loaded.value  # type: ignore[assignment]
    result.input_size, result.input_mode = picture.size, picture.mode
    result.notes, result.warnings = list(picture.notes), list(picture.notes)
    if on_start is not None:
        on_start(job)
    try:
        upscaled = pipeline.upscale_with_info(picture.color, options)
    except Exception as error:
        result.error = describe_error(job, error)
        return _closed(result), None, None
    result.timings.update(upscaled.timings)
    result.notes += upscaled.notes
    return result, picture, upscaled.image


def _save(
    save: SaveFunction,
    job: Job,
    picture: Picture,
    quality: int,
    manifest: Manifest | None,
    upscaled,
) -> _Written:
    """Compose and write one output (on the write-behind thread)."""
    start = time.perf_counter()
    pixels = compose(picture, upscaled)
    composed = time.perf_counter()
    record = None
    if manifest is not None:
        record = partial(manifest.record, job.source, job.output)
    notes = save(pixels, job.output, quality, record)
    return _Written(notes, pixels.size, composed - start, time.perf_counter() - composed)


def _finished(
    pending: deque[tuple[JobResult, Future | None]], wait: bool = False
) -> Iterator[JobResult]:
    """Results at the head of ``pending`` whose writes are over, in order (all with wait)."""
    while pending:
        result, future = pending[0]
        if future is not None and not (wait or future.done()):
            return
        pending.popleft()
        if future is not None:
            _complete(result, future)
        yield result


def _complete(result: JobResult, future: Future) -> None:
    try:
        written: _Written = future.result()
    except Exception as error:
        result.error = describe_error(result.job, error)
    else:
        result.status = DONE
        result.output_size = written.output_size
        result.notes += written.notes
        result.warnings += written.notes
        result.timings["compose"] = written.compose_seconds
        result.timings["write"] = written.write_seconds
    _closed(result)


def _closed(result: JobResult) -> JobResult:
    result.seconds = sum(result.timings.values())
    return result


def describe_error(job: Job, error: BaseException) -> str:
    """One line naming the job's file and what went wrong (``errors.describe_error``)."""
    return describe(job.source, error)


def run_job(pipeline, job: Job, options: UpscaleOptions) -> JobResult:
    """One job, start to end, in this thread."""
    batch = BatchOptions(read_ahead=0, write_behind=0)
    return next(run_jobs(pipeline, [job], options, batch))
