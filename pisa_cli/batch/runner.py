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
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

from pisa_cli.core.planning import check_pixels
from pisa_cli.errors import describe_error
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.io import read_picture, write_output
from pisa_cli.imaging.manifest import Manifest
from pisa_cli.imaging.modes import Picture, compose
from pisa_cli.imaging.stream import Loaded, WriteBehind, read_ahead
from pisa_cli.options import BatchOptions, UpscaleOptions, WriteOptions

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
    batch: int = 1
    """Images that shared this one's model calls (``--image-batch``), itself included."""

    @property
    def model_seconds(self) -> float:
        return sum(self.timings.get(stage, 0.0) for stage in MODEL_STAGES)


SaveFunction = Callable[..., list[str]]
"""write_output's signature: (pixels, path, write options, before_replace) -> notes."""


@dataclass(frozen=True)
class _Written:
    notes: list[str]
    output_size: tuple[int, int]
    compose_seconds: float
    write_seconds: float


LOOK_AHEAD_BATCHES = 3
"""Images read wait for batch-mates in a window of this many batches at most: a folder of
mixed sizes still streams, and memory holds a few batches, never the folder."""


@dataclass
class _Entry:
    """A job's place in the output order: its result once the model is done with it."""

    result: JobResult
    future: Future | None = None
    ready: bool = False


@dataclass
class _Waiting:
    """An image read, waiting in the window for images of its shape."""

    entry: _Entry
    picture: Picture
    key: Hashable
    size: int


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

    Images of one shape go through the model together, ``batch.image_batch`` at a time
    (``pipeline.batching`` says which and how many; a pipeline without it runs one image
    at a time), gathered in a window of LOOK_AHEAD_BATCHES batches. ``manifest`` records
    every output written. ``on_start`` is called (in this thread) as an image enters the
    model. Setting ``stop`` ends the run after the current batch; a KeyboardInterrupt
    abandons it. Either way the images already finished are written, their results
    yielded, and nothing partial is left.
    """
    batch = batch or BatchOptions()
    stop = stop or threading.Event()
    read = partial(_read, options=options, max_pixels=batch.max_pixels)
    loads = read_ahead(jobs, read, batch.read_ahead)
    pending: deque[_Entry] = deque()
    window: list[_Waiting] = []
    with WriteBehind(batch.write_behind) as writer:

        def run(group: list[_Waiting]) -> None:
            for waiting in group:
                window.remove(waiting)
            for waiting, upscaled in _upscale(pipeline, group, options, batch, on_start):
                entry = waiting.entry
                if upscaled is not None:
                    picture, job = waiting.picture, entry.result.job
                    save_one = partial(_save, save, job, picture, batch.write, manifest)
                    entry.future = writer.submit(save_one, upscaled)
                entry.ready = True

        try:
            for loaded in loads:
                if stop.is_set():
                    break
                entry = _Entry(JobResult(job=loaded.item, status=FAILED))
                pending.append(entry)
                waiting = _admit(pipeline, loaded, entry, options, batch.image_batch)
                if waiting is not None:
                    window.append(waiting)
                while not stop.is_set() and (group := _due(window)):
                    run(group)
                yield from _finished(pending)
            while not stop.is_set() and (group := _due(window, final=True)):
                run(group)
                yield from _finished(pending)
        except KeyboardInterrupt:
            stop.set()  # the batch in the model is abandoned; finished ones are still written
        finally:
            loads.close()
        yield from _finished(pending, wait=True)


def _read(job: Job, options: UpscaleOptions, max_pixels: int) -> Picture:
    picture = read_picture(job.source, max_pixels)
    check_pixels(job.source, picture.size, options, max_pixels)
    return picture


def _admit(
    pipeline, loaded: Loaded, entry: _Entry, options: UpscaleOptions, requested: int | None
) -> _Waiting | None:
    """The image read, waiting for the model; None when it failed to read (then its
    entry is ready, failed)."""
    result = entry.result
    result.timings["read"] = loaded.seconds
    if loaded.error is not None:
        result.error = describe_error(result.job.source, loaded.error)
        _closed(result)
        entry.ready = True
        return None
    picture: Picture = loaded.value  # type: ignore[assignment]
    result.input_size, result.input_mode = picture.size, picture.mode
    result.notes, result.warnings = list(picture.notes), list(picture.notes)
    batching = getattr(pipeline, "batching", None)
    key, size = (None, 1)
    if batching is not None and requested != 1:
        try:
            key, size = batching(picture.color, options, requested)
        except Exception:  # the image fails in the model, alone, with its own error
            key, size = None, 1
    return _Waiting(entry, picture, (id(entry),) if key is None else key, size)


def _due(window: list[_Waiting], final: bool = False) -> list[_Waiting]:
    """The next batch to run: the first full one; when the window is full (or ``final``,
    the folder read) the oldest image's, as it is; else none (empty)."""
    groups: dict[Hashable, list[_Waiting]] = {}
    for waiting in window:
        groups.setdefault(waiting.key, []).append(waiting)
    for group in groups.values():
        if len(group) >= group[0].size:
            return group[: group[0].size]
    if not window:
        return []
    oldest = groups[window[0].key]
    if final or len(window) >= LOOK_AHEAD_BATCHES * oldest[0].size:
        return oldest[: oldest[0].size]
    return []


def _upscale(
    pipeline, group: list[_Waiting], options: UpscaleOptions, batch: BatchOptions, on_start
) -> list[tuple[_Waiting, object]]:
    """(waiting, upscaled colour) of each image of ``group``; upscaled is None when the
    image failed (its result says why)."""
    if on_start is not None:
        for waiting in group:
            on_start(waiting.entry.result.job)
    images = [waiting.picture.color for waiting in group]
    if len(group) == 1:
        try:
            outcomes: list = [pipeline.upscale_with_info(images[0], options)]
        except Exception as error:
            outcomes = [error]
    else:
        try:
            outcomes = pipeline.upscale_many(images, options, batch.image_batch)
        except Exception as error:  # each image says so; the batch after it goes on
            outcomes = [error] * len(group)
    done = []
    for waiting, outcome in zip(group, outcomes, strict=True):
        result = waiting.entry.result
        if isinstance(outcome, Exception):
            result.error = describe_error(result.job.source, outcome)
            _closed(result)
            done.append((waiting, None))
            continue
        result.timings.update(outcome.timings)
        result.notes += outcome.notes
        result.batch = getattr(outcome, "batch", 1)
        done.append((waiting, outcome.image))
    return done


def _save(
    save: SaveFunction,
    job: Job,
    picture: Picture,
    write: WriteOptions,
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
    notes = save(pixels, job.output, write, record)
    return _Written(notes, pixels.size, composed - start, time.perf_counter() - composed)


def _finished(pending: deque[_Entry], wait: bool = False) -> Iterator[JobResult]:
    """Results at the head of ``pending`` whose writes are over, in order. With ``wait``
    (the end): every write is waited for, and images that never ran (a stop) are dropped."""
    while pending:
        entry = pending[0]
        if not wait and not (entry.ready and (entry.future is None or entry.future.done())):
            return
        pending.popleft()
        if not entry.ready:
            continue
        if entry.future is not None:
            _complete(entry.result, entry.future)
        yield entry.result


def _complete(result: JobResult, future: Future) -> None:
    try:
        written: _Written = future.result()
    except Exception as error:
        result.error = describe_error(result.job.source, error)
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
