"""The sweep against separate upscales: a 5 x 5 lambda grid on a 128 x 128 photo, on the
full-size SD 2.1-base architecture with random weights, all in one process."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from pisa_cli.bench import Row, measured, scenario
from pisa_cli.bench.upscale import noise_photo, random_sd21_pipeline
from pisa_cli.options import UpscaleOptions
from pisa_cli.sweep.core import BASIS, Sweeper, blend_basis
from pisa_cli.sweep.grid import parse_grid, plan_options

NAME = "sweep-5x5"
GRID = "pix=0:1:0.25 sem=0:1:0.25"
SIZE = 128


@scenario(NAME)
def sweep_5x5(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """5x5 lambdas on a 128x128 photo: exact sweep and 3-basis blend vs 25 upscales."""
    rows: list[Row] = []
    options = UpscaleOptions()
    pipeline = random_sd21_pipeline(device, dtype, merged=_merged(options))
    image, grid = noise_photo(SIZE), parse_grid(GRID)
    pipeline.models.embed(options.prompt)  # every case encodes the prompt once per run: not timed
    sweeper = Sweeper(pipeline, options)
    calls_before = pipeline.models.unet_calls  # a shared pipeline (bench gpu) has run before

    with measured(rows, NAME, f"exact sweep, {grid.size} decodes", device) as exact_row:
        cpu = time.process_time()
        prepared = sweeper.prepare(image)
        exact = {point: np.asarray(im) for point, im in sweeper.images(prepared, grid.points)}
        exact_row.figures["cpu_s"] = round(time.process_time() - cpu, 1)
    exact_row.figures.update(
        unet_calls=prepared.unet_calls,
        decoder_batch=prepared.decode_batch,
        **{k: round(v, 2) for k, v in prepared.timings.items()},
    )

    with measured(rows, NAME, "three-basis blend, 3 decodes", device) as blend_row:
        cpu = time.process_time()
        prepared = sweeper.prepare(image)
        decoded = dict(sweeper.images(prepared, list(BASIS.values())))
        basis = {name: np.asarray(decoded[point]) for name, point in BASIS.items()}
        blends = {point: blend_basis(basis, point.pix, point.sem) for point in grid.points}
        blend_row.figures["cpu_s"] = round(time.process_time() - cpu, 1)

    with measured(rows, NAME, f"{grid.size} separate upscales", device) as separate_row:
        cpu = time.process_time()
        separate = {
            point: np.asarray(
                pipeline.upscale(
                    image, replace(options, lambda_pix=point.pix, lambda_sem=point.sem)
                )
            )
            for point in grid.points
        }
        separate_row.figures["cpu_s"] = round(time.process_time() - cpu, 1)
    separate_row.figures["unet_calls_total"] = (
        pipeline.models.unet_calls - calls_before - 2 * prepared.unet_calls
    )

    exact_row.figures["speedup"] = round(separate_row.seconds / exact_row.seconds, 2)
    exact_row.figures["max_diff_vs_upscale"] = _max_diff(exact, separate)
    blend_row.figures["speedup"] = round(separate_row.seconds / blend_row.seconds, 2)
    for row in (exact_row, blend_row):  # CPU time suffers less from other loads on the machine
        row.figures["cpu_speedup"] = round(
            float(separate_row.figures["cpu_s"]) / float(row.figures["cpu_s"]), 2
        )
    blend_row.figures["max_diff_vs_exact"] = _max_diff(blends, exact)
    blend_row.figures["mean_diff_vs_exact"] = round(
        float(np.mean([np.abs(blends[p].astype(int) - exact[p]).mean() for p in grid.points])), 3
    )
    return rows


def _merged(options: UpscaleOptions) -> str:
    from pisa_cli.core.loading import merged_variant

    return merged_variant(plan_options(options))


def _max_diff(ours: dict, theirs: dict) -> int:
    return int(max(np.abs(ours[p].astype(int) - theirs[p].astype(int)).max() for p in ours))
