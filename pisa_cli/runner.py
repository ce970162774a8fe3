"""Streams jobs through the pipeline: one result per image, a failing image never stops the rest.

The runner knows nothing of progress bars or terminals: it yields results and the CLI
displays them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from pisa_cli.errors import ImageError, PisaError
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.io import read_image, write_image
from pisa_cli.options import ModelOptions, SecondPassOptions, UpscaleOptions
from pisa_cli.planning import ImagePlan

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


@dataclass
class JobResult:
    """What happened to one job."""

    job: Job
    status: str
    """done, skipped or failed."""
    error: str = ""
    """One line naming the file and the reason, when failed."""
    seconds: float = 0.0
    input_size: tuple[int, int] | None = None
    output_size: tuple[int, int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (read, preprocess, text, encode, unet, decode, color, write)."""
    notes: list[str] = field(default_factory=list)
    """What the pipeline changed on the way (out-of-memory retries, fp32 redos)."""


def run_jobs(pipeline, jobs: Iterable[Job], options: UpscaleOptions) -> Iterator[JobResult]:
    """Upscale each job's source into its output, yielding a result per job, in order."""
    for job in jobs:
        yield run_job(pipeline, job, options)


def run_job(pipeline, job: Job, options: UpscaleOptions) -> JobResult:
    start = time.perf_counter()
    timings: dict[str, float] = {}
    result = JobResult(job=job, status=FAILED)
    try:
        image = read_image(job.source)
        timings["read"] = time.perf_counter() - start
        result.input_size = image.size
        upscaled = pipeline.upscale_with_info(image, options)
        timings.update(upscaled.timings)
        result.notes = upscaled.notes
        mark = time.perf_counter()
        write_image(upscaled.image, job.output)
        timings["write"] = time.perf_counter() - mark
        result.output_size = upscaled.image.size
        result.status = DONE
    except ImageError as error:
        result.error = str(error)
    except PisaError as error:
        result.error = f"{job.source}: {error}"
    except MemoryError:
        result.error = f"{job.source}: out of memory"
    except Exception as error:
        log.debug("unexpected failure on %s", job.source, exc_info=True)
        result.error = f"{job.source}: internal error ({type(error).__name__}: {error})"
    result.seconds = time.perf_counter() - start
    result.timings = timings
    return result


def dry_run(
    jobs: Iterable[Job], options: UpscaleOptions, model: ModelOptions
) -> Iterator[tuple[Job, list[ImagePlan] | str]]:
    """The plans of each job (one per pass) from its image header, without loading a model.

    Channel widths come from the base model's configs when it is on disk, else from SD
    2.1-base's; the free memory is that of the device the run would use.
    """
    from pisa_cli.engine.memory import Widths
    from pisa_cli.imaging.io import read_size
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
    for job in jobs:
        try:
            size = read_size(job.source)
        except ImageError as error:
            yield job, str(error)
            continue
        plans = [plan_image(size, options, widths, dtype.itemsize, free_memory(device))]
        if options.second_pass.kind != "none":
            second = replace(options, scale=2, second_pass=SecondPassOptions())
            variants = ("second",) if options.second_pass.kind == "tudsr" else None
            size = plans[0].resize.output_size
            free = free_memory(device)
            plans.append(plan_image(size, second, widths, dtype.itemsize, free, variants))
        yield job, plans
