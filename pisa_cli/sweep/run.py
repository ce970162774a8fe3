"""Sweeps images one by one: each image's files land in ``OUTDIR/<name>/``, a failing image
never stops the rest, and a failed image leaves nothing behind.

The files of one image are made in a hidden staging folder and moved into place only when
all of them are complete. Like the folder runner, this module yields one result per image
and knows nothing of terminals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pisa_cli.core.planning import check_pixels
from pisa_cli.errors import ImageError, OptionsError, describe_error
from pisa_cli.fsutil import TEMP_PREFIX
from pisa_cli.imaging.discover import Job, image_extensions
from pisa_cli.imaging.io import read_image, read_picture
from pisa_cli.sweep.core import Sweeper
from pisa_cli.sweep.files import OWN_FILES, write_sweep
from pisa_cli.sweep.grid import GridPoint
from pisa_cli.sweep.metrics import MetricSet
from pisa_cli.sweep.settings import SweepSettings

log = logging.getLogger(__name__)

DONE, FAILED = "done", "failed"


@dataclass
class SweepResult:
    """What happened to one input image."""

    job: Job
    """The input, and its output folder (``job.output``)."""
    status: str
    error: str = ""
    """One line naming the file and the reason, when failed."""
    seconds: float = 0.0
    unet_calls: int = 0
    decodes: int = 0
    best: dict[str, tuple[GridPoint, float]] = field(default_factory=dict)
    """The best grid point and its value per metric."""
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def sweep_jobs(
    pipeline,
    jobs: Iterable[Job],
    settings: SweepSettings,
    metrics: MetricSet | None = None,
    merged=None,
) -> Iterator[SweepResult]:
    """Sweep each job's source into its folder, yielding a result per job, in order.
    ``merged``: the model with the PiSA weights merged, where ``sweep.core.needs_merged``
    says the grid needs it."""
    sweeper = Sweeper(pipeline, settings.options, settings.image_batch, merged)
    for job in jobs:
        yield sweep_job(sweeper, job, settings, metrics)


def sweep_job(
    sweeper: Sweeper, job: Job, settings: SweepSettings, metrics: MetricSet | None
) -> SweepResult:
    start = time.perf_counter()
    result = SweepResult(job=job, status=FAILED)
    try:
        # as `pisa upscale` reads it: the model sees the colour (16-bit as float); grey and
        # transparency come back in each point's file (``write_sweep``)
        picture = read_picture(job.source, settings.max_pixels)
        check_pixels(job.source, picture.size, settings.options, settings.max_pixels)
        truth = None
        if metrics is not None and metrics.needs_gt:
            if settings.gt_dir is None:
                raise OptionsError("metrics against the ground truth need --gt DIR")
            truth = read_truth(settings.gt_dir, job.source, sweeper.output_size(picture.size))
        prepared = sweeper.prepare(picture.color)
        result.unet_calls = prepared.unet_calls
        log.info(
            "%s: encoded, UNet pix + pisa in %d call(s); decoding %d points, %d per call",
            job.source.name,
            prepared.unet_calls,
            settings.grid.size,
            min(prepared.decode_batch, settings.grid.size),
        )
        with staged_folder(job.output) as folder:
            result.best = write_sweep(
                folder, job, picture, sweeper, prepared, settings, metrics, truth
            )
        result.decodes, result.timings, result.notes = (
            prepared.decodes,
            prepared.timings,
            prepared.notes,
        )
        result.status = DONE
    except Exception as error:
        result.error = describe_error(job.source, error)
    result.seconds = time.perf_counter() - start
    return result


def find_truth(folder: Path, source: Path) -> Path:
    """The ground-truth image in ``folder`` with ``source``'s stem; ImageError if none or
    several."""
    known = image_extensions()
    matches = sorted(
        path
        for path in folder.iterdir()
        if path.stem == source.stem and path.suffix.lower() in known and path.is_file()
    )
    if not matches:
        raise ImageError(f"{source}: no ground truth named {source.stem}.* in {folder}")
    if len(matches) > 1:
        names = ", ".join(path.name for path in matches)
        raise ImageError(f"{source}: several ground truths match in {folder} ({names}); keep one")
    return matches[0]


def read_truth(folder: Path, source: Path, size: tuple[int, int]) -> Image.Image:
    """The ground truth of ``source``, which must be ``size`` (the output's size)."""
    path = find_truth(folder, source)
    truth = read_image(path)
    if truth.size != size:
        raise ImageError(
            f"{path}: ground truth is {truth.width}x{truth.height} but the output of {source.name} "
            f"is {size[0]}x{size[1]}; the ground truth must have the output's size"
        )
    return truth


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield a hidden folder next to ``final``; on success move its files into ``final``.

    Files of an earlier sweep that this one did not make again (another grid's images) are
    removed, so the folder always matches its sweep.json; other files are left alone. On an
    exception the staging folder goes and ``final`` is untouched.
    """
    if final.is_symlink():  # its files would land wherever the link leads
        raise ImageError(f"{final}: is a link; the sweep writes only into real folders of -o")
    if final.exists() and not final.is_dir():
        raise ImageError(f"{final}: exists and is not a folder; move it or choose another -o")
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=final.parent))
    try:
        yield stage
        final.mkdir(exist_ok=True)
        made = {path.name for path in stage.iterdir()}
        for path in final.iterdir():
            if path.name not in made and path.is_file() and _is_own_file(path.name):
                path.unlink()
        for name in sorted(made):
            os.replace(stage / name, final / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _is_own_file(name: str) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(name, pattern) for pattern in OWN_FILES)
