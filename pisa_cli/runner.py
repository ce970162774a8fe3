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
from dataclasses import asdict, dataclass, field, replace
from functools import partial

from pisa_cli.errors import ImageError, PisaError
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.io import read_picture, write_output
from pisa_cli.imaging.manifest import RUN, Decision, Manifest
from pisa_cli.imaging.modes import Picture, compose
from pisa_cli.imaging.stream import Loaded, WriteBehind, read_ahead
from pisa_cli.options import BatchOptions, ModelOptions, SecondPassOptions, UpscaleOptions
from pisa_cli.planning import ImagePlan

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
    read = partial(_read, max_pixels=batch.max_pixels)
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


def _read(job: Job, max_pixels: int) -> Picture:
    return read_picture(job.source, max_pixels)


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
    """One line naming the file and what went wrong."""
    if isinstance(error, ImageError):
        return str(error)
    if isinstance(error, PisaError):
        return f"{job.source}: {error}"
    if isinstance(error, MemoryError):
        return f"{job.source}: out of memory"
    log.debug("unexpected failure on %s", job.source, exc_info=error)
    return f"{job.source}: internal error ({type(error).__name__}: {error})"


PIXELS_VERSION = 1
"""Bumped when the way outputs are made changes (a new release redoes older outputs)."""


def run_settings(options: UpscaleOptions, batch: BatchOptions, model: dict) -> dict:
    """Everything an output's pixels depend on, as recorded in the manifest: the upscale
    options, the model (weights, base model, precision), the quality of lossy formats. The
    format and suffix are in the output's name already."""
    settings = {"upscale": asdict(options), "model": model, "pixels": PIXELS_VERSION}
    if batch.format in ("jpg", "webp", "same"):
        settings["quality"] = batch.quality
    return settings


def sort_jobs(
    jobs: Iterable[Job], manifest: Manifest, overwrite: bool = False
) -> tuple[list[Job], dict[Job, str], list[JobResult]]:
    """(jobs to run, why each runs, results of the skipped ones), from the manifest."""
    to_run, reasons, skipped = [], {}, []
    for job in jobs:
        try:
            decision = manifest.decide(job.source, job.output, overwrite)
        except OSError as error:  # cannot tell: run it, the reader or writer will say why
            decision = Decision(RUN, f"cannot check the output ({error.strerror or error})")
        if decision.action == RUN:
            to_run.append(job)
            reasons[job] = decision.reason
        else:
            skipped.append(JobResult(job=job, status=SKIPPED, reason=decision.reason))
    return to_run, reasons, skipped


def run_job(pipeline, job: Job, options: UpscaleOptions) -> JobResult:
    """One job, start to end, in this thread."""
    batch = BatchOptions(read_ahead=0, write_behind=0)
    return next(run_jobs(pipeline, [job], options, batch))


def dry_run(
    jobs: Iterable[Job], options: UpscaleOptions, model: ModelOptions
) -> Iterator[tuple[Job, list[ImagePlan] | str]]:
    """The plans of each job (one per pass) from its image header, without loading a model.

    Channel widths come from the base model's configs when it is on disk, else from SD
    2.1-base's; the free memory is that of the device the run would use. The families (and
    so the tile grids) follow the weights' names.
    """
    from pisa_cli.engine.memory import Widths
    from pisa_cli.imaging.io import read_size
    from pisa_cli.models.adapters import OMGSR, family_of
    from pisa_cli.models.base import find_local_base_model, read_part_config
    from pisa_cli.models.device import free_memory, resolve_device, resolve_dtype
    from pisa_cli.planning import plan_image

    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    widths = Widths()
    folder = find_local_base_model(model.resolved_base_model())
    if folder is not None:
        unet, vae = read_part_config(folder, "unet"), read_part_config(folder, "vae")
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        widths = Widths(unet["block_out_channels"][0], vae["block_out_channels"][0], factor)
    first = family_of(model.resolved_weights())
    kind = options.second_pass.kind
    second_omgsr = kind == "tudsr" and family_of(options.second_pass.weights) == OMGSR
    for job in jobs:
        try:
            size = read_size(job.source)
        except ImageError as error:
            yield job, str(error)
            continue
        free = free_memory(device)
        if first == OMGSR:
            plans = [plan_image(size, options, widths, dtype.itemsize, free, ("first",), OMGSR)]
        else:
            plans = [plan_image(size, options, widths, dtype.itemsize, free)]
        if kind != "none":
            second = replace(options, scale=2, timestep=None, second_pass=SecondPassOptions())
            variants = ("second",) if kind == "tudsr" else plans[0].variants
            tiling = OMGSR if second_omgsr else "stablesr"
            size = plans[0].resize.output_size
            free = free_memory(device)
            plans.append(plan_image(size, second, widths, dtype.itemsize, free, variants, tiling))
        yield job, plans
