"""Whole-pipeline scenarios: the same runner as `pisa upscale`, on files, full-size models."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from pisa_cli.batch.runner import run_jobs
from pisa_cli.bench import Row, measured, scenario
from pisa_cli.core.pipeline import PisaPipeline
from pisa_cli.imaging.discover import discover
from pisa_cli.options import BatchOptions, SecondPassOptions, UpscaleOptions

_SHARED: dict[tuple, PisaPipeline] | None = None


@contextmanager
def shared_pipelines() -> Iterator[None]:
    """Within: scenarios asking for the same random pipeline get the one already built
    (the GPU proof runs several; each full-size build costs seconds and memory)."""
    global _SHARED
    _SHARED = {}
    try:
        yield
    finally:
        _SHARED = None


def random_sd21_pipeline(
    device: torch.device, dtype: torch.dtype, merged: str = "pisa", second_rank: int = 0
) -> PisaPipeline:
    """The full SD 2.1-base architecture with random weights and a random PiSA-SR LoRA (and
    a random second-pass LoRA of ``second_rank``, TUDSR-S uses 32)."""
    from pisa_cli.core.random import random_pipeline as build

    key = (str(device), dtype, merged, second_rank)
    if _SHARED is not None and key in _SHARED:
        return _SHARED[key]
    pipeline = build("sd21-base", device, dtype, merged=merged, second_rank=second_rank)
    if _SHARED is not None:
        _SHARED[key] = pipeline
    return pipeline


def noise_photo(size: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, max(2, size // 16), max(2, size // 16), generator=generator)
    image = torch.nn.functional.interpolate(coarse[None], size=(size, size), mode="bicubic")[0]
    image = (image + torch.randn(3, size, size, generator=generator) * 0.05).clamp(0, 1)
    array = (image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    return Image.fromarray(array)


def run_folder(
    rows: list[Row],
    name: str,
    case: str,
    pipeline: PisaPipeline,
    sizes: list[int],
    options: UpscaleOptions,
    batch: BatchOptions | None = None,
) -> Row:
    """Write ``sizes`` images to a folder and upscale it with the runner, measured
    (``batch``: the runner's options, --image-batch among them)."""
    with tempfile.TemporaryDirectory(prefix="pisa-bench-") as folder:
        inputs, outputs = Path(folder) / "in", Path(folder) / "out"
        inputs.mkdir()
        for index, size in enumerate(sizes):
            noise_photo(size, index).save(inputs / f"image{index:03d}.png")
        jobs = discover([inputs], outputs).jobs
        outputs.mkdir()
        with measured(rows, name, case, pipeline.models.device) as row:
            results = list(run_jobs(pipeline, jobs, options, batch))
        stages: dict[str, float] = {}
        for result in results:
            if result.status != "done":
                raise RuntimeError(f"bench image failed: {result.error}")
            for stage, seconds in result.timings.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
        row.figures.update({k: round(v, 2) for k, v in stages.items()})
        row.figures["image_batch"] = max(result.batch for result in results)
        notes = [note for result in results for note in getattr(result, "notes", [])]
        if notes:
            row.figures["notes"] = "; ".join(notes)
    return row


@scenario("upscale-512-2048")
def upscale_large(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """A 512x512 photo to 2048x2048 with the automatic plan: wall time and peak memory."""
    rows: list[Row] = []
    pipeline = random_sd21_pipeline(device, dtype)
    options = UpscaleOptions()
    plan = pipeline.plan((512, 512), options)
    row = run_folder(rows, "upscale-512-2048", "512->2048 auto plan", pipeline, [512], options)
    row.figures["unet_tiles"] = len(plan.unet.tiles)
    row.figures["unet_waste"] = round(plan.unet.waste, 3)
    return rows


@scenario("second-pass")
def second_pass(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """64x64 -> 512x512 as x4 (PiSA-SR) then x2 (a rank-32 second LoRA): time per stage."""
    rows: list[Row] = []
    pipeline = random_sd21_pipeline(device, dtype, merged="second", second_rank=32)
    second = SecondPassOptions(kind="tudsr", weights="(random)")
    options = UpscaleOptions(second_pass=second)
    run_folder(rows, "second-pass", "64->256->512 x4+x2", pipeline, [64], options)
    return rows
