"""Helpers shared by the test modules (fixtures live in conftest): running the CLI in
process (on the model) and in a real process, what a run left in a folder, and the checks
of closeness and of batches. Builders of images and weights are in ``tests.builders``;
fake pipelines in ``tests.fakes``.

Test modules import helpers from these three only, never from each other.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from pisa_cli.cli import app
from pisa_cli.fsutil import TEMP_PREFIX
from pisa_cli.options import UpscaleOptions
from tests.builders import noise_image, ramp16

REPO = Path(__file__).parents[1]


def assert_close(ours: Image.Image, theirs: Image.Image, mean: float = 0.5) -> None:
    """The correctness bar: within 3/255 per pixel, mean difference under ``mean``/255.

    (Float differences of 1e-6 can flip the reference's 8-bit truncation by a level, and the
    colour fix can stretch that level by the contrast ratio of source and output.)"""
    assert ours.size == theirs.size
    diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
    assert diff.max() <= 3 and diff.mean() < mean, (diff.max(), diff.mean())


runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def visible(folder):
    """Names of the files in ``folder``, without hidden ones (the manifest)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def model_args(tiny_base, pisa_pkl):
    return ["--base-model", str(tiny_base), "--weights", str(pisa_pkl), "--device", "cpu"]


def batch_differences(color_fixes: Sequence[str]) -> dict[str, float]:
    """Per colour fix, the largest difference between four 16-bit images (two smooth, two
    ramps) upscaled in one batch and one by one, on the tiny model in bf16 on the CPU, in
    float: a 16-bit output is the colour fix's float result, so any rounding a batch changed
    shows."""
    from pisa_cli.core.random import random_pipeline
    from pisa_cli.imaging.deep import DeepImage

    pipe = random_pipeline("tiny", torch.device("cpu"), torch.bfloat16)
    smooth = [np.asarray(noise_image(24, 20, seed), dtype=np.float32) / 255 for seed in (1, 2)]
    images = [DeepImage.from_array(array) for array in smooth]
    images += [DeepImage.from_uint16(ramp16(24, 20, 3, seed=seed)) for seed in (3, 4)]
    worst = {}
    for color_fix in color_fixes:
        options = UpscaleOptions(process_size=64, color_fix=color_fix)
        batched = pipe.upscale_many(images, options, 4)
        worst[color_fix] = 0.0
        for image, result in zip(images, batched, strict=True):
            assert result.batch == 4, result
            alone = pipe.upscale(image, options).to_array()
            difference = float(np.abs(result.image.to_array() - alone).max())
            worst[color_fix] = max(worst[color_fix], difference)
    return worst


def pisa(*args: object) -> list[str]:
    return [sys.executable, "-m", "pisa_cli", "upscale", *map(str, args)]


def environment() -> dict[str, str]:
    """This checkout's code (not an installed copy), the tests' isolated caches, and one
    torch thread: on a busy two-core machine the tiny model runs many times faster so, and
    every run of a test computes the same bytes either way."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def visible_bytes(folder: Path) -> dict[str, bytes]:
    """Name -> bytes of every visible file in ``folder`` (the manifest is hidden)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def temporaries(folder: Path) -> list[Path]:
    return list(folder.glob(f"{TEMP_PREFIX}*"))


def check_partial_then_rerun(
    args: list[str], env: dict[str, str], out: Path, expected: dict[str, bytes]
) -> None:
    """What a killed run left in ``out`` is complete and right, and running ``args`` again
    does exactly the rest: the whole expected set, no temporaries."""
    partial = visible_bytes(out)
    for name, data in partial.items():
        assert data == expected[name], name
    again = subprocess.run(args, env=env, text=True, capture_output=True)
    assert again.returncode == 0, again.stderr
    done, skipped = len(expected) - len(partial), len(partial)
    assert f"{done} done, {skipped} skipped, 0 failed" in again.stderr
    assert visible_bytes(out) == expected
    assert not temporaries(out)


OURS = re.compile(r"\[\d+/\d+\] |warning: |error: |(INFO|WARNING|ERROR) |\d+ done, |\d+ outputs ")
"""How every line pisa upscale prints begins (progress, warnings, log lines, the summary)."""


def not_ours(output: str) -> list[str]:
    """The lines of ``output`` that pisa did not print (Ray's, a library's)."""
    return [line for line in output.splitlines() if line.strip() and not OURS.match(line)]
