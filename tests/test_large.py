"""Large images: the automatic plan tiles what does not fit, and VAE memory stays flat."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pisa_cli.core.pipeline as pipeline_module
from pisa_cli.options import UpscaleOptions
from tests.builders import noise_image

MIB = 2**20


@pytest.mark.slow
def test_large_input_upscales_with_the_vae_tiled_on_disk(pipeline, monkeypatch):
    # pretend the machine is small: the plan must tile the VAE and keep planes on disk
    # (20 MiB for 256x192 plans like 200 MiB for 1024x768: bands, disk, UNet tiles)
    monkeypatch.setattr(pipeline_module, "free_memory", lambda device: 20 * MIB)
    result = pipeline.upscale_with_info(noise_image(256, 192, 1), UpscaleOptions())
    assert result.image.size == (1024, 768)
    plan = result.plan
    assert plan.encoder_tile is not None and plan.decoder_tile is not None
    assert plan.store == "disk" and plan.unet.tiled
    assert not result.notes


MEASURE = """
import sys, torch
from pisa_cli import load_pipeline
from pisa_cli.bench import PeakMemory
from tests.helpers import noise_image

pipeline = load_pipeline(weights=sys.argv[2], base_model=sys.argv[1], device="cpu", dtype="fp32")
for height, width in ((48, 64), (192, 256)):
    latents = torch.randn(1, 4, height, width)
    with PeakMemory(torch.device("cpu")) as peak:
        image = pipeline.models.decode(latents, (height * 8, width * 8), tile=32, store="disk")
    print(peak.peak - image.numel() * image.element_size())
    del image
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the RSS peak from /proc")
def test_tiled_decoder_memory_does_not_grow_with_the_image(tiny_base, pisa_pkl):
    """Peak memory of the tiled decoder minus its output buffer, for a latent 16 times larger,
    with the same tile: the working memory is the tile's, not the image's (about 40 MiB for
    both here; the untiled decoder takes 1.7 GB for the larger). Measured in a
    process of its own: the RSS peak of the test process carries the heap of earlier tests."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tiny_base), str(pisa_pkl)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    small, large = map(int, done.stdout.split())
    assert large - small < 48 * MIB, (small / MIB, large / MIB)
