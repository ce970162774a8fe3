"""Streams jobs through the pipeline: one result per image, a failing image never stops the rest.

The runner knows nothing of progress bars or terminals: it yields results and the CLI
displays them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pisa_cli.errors import ImageError, PisaError
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.io import read_image, write_image
from pisa_cli.options import UpscaleOptions

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
