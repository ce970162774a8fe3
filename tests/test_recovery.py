"""Out-of-memory retries with smaller tiles, and fp32 redos of non-finite VAE passes."""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from pisa_cli import load_pipeline
from pisa_cli.engine import vae as vae_module
from pisa_cli.errors import OutOfMemoryError
from pisa_cli.models.device import is_out_of_memory
from pisa_cli.options import TileOptions, UpscaleOptions
from tests.helpers import assert_close, noise_image

OPTIONS = UpscaleOptions(process_size=64)


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("shapes do not match"))


def refuse_above(monkeypatch, name, limit):
    """Make vae.<name> fail like an allocator would for tiles above ``limit`` (None = whole)."""
    original = getattr(vae_module, name)
    seen = []

    def fake(*args, tile=None, **kwargs):
        seen.append(tile)
        if tile is None or tile > limit:
            raise MemoryError
        return original(*args, tile=tile, **kwargs)

    monkeypatch.setattr(vae_module, name, fake)
    return seen


@pytest.mark.parametrize(("stage", "limit"), [("decode", 8), ("encode", 64)])
def test_vae_out_of_memory_halves_the_tile_and_gives_the_same_image(
    pipeline, monkeypatch, stage, limit
):
    image = noise_image(64, 48, 1)  # latent 32 x 24: whole, then tiles of 16 and 8
    expected = pipeline.upscale(image, OPTIONS)
    seen = refuse_above(monkeypatch, stage, limit)
    result = pipeline.upscale_with_info(image, OPTIONS)
    assert seen[0] is None and seen[-1] <= limit and len(seen) >= 3
    assert all(b < a for a, b in itertools.pairwise(seen[1:]))  # halved each time
    stage_name = "VAE decoder" if stage == "decode" else "VAE encoder"
    assert any(note.startswith(f"{stage_name} out of memory") for note in result.notes)
    assert_close(result.image, expected, mean=0.01)


def test_unet_out_of_memory_lowers_the_batch_then_the_tile(pipeline, monkeypatch):
    import pisa_cli.core.pipeline as pipeline_module

    original = pipeline_module.predict_eps
    tried = []

    def fake(unet, latents, cond, plan, variants, tile_batch=1, timestep=1, **kwargs):
        tried.append((plan.tile_size, tile_batch))
        if tile_batch > 1 or max(plan.tile_size) > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return original(unet, latents, cond, plan, variants, tile_batch, timestep, **kwargs)

    monkeypatch.setattr(pipeline_module, "predict_eps", fake)
    options = replace(OPTIONS, tiles=TileOptions(latent_tile=16, latent_overlap=4, tile_batch=4))
    result = pipeline.upscale_with_info(noise_image(64, 48, 2), options)  # latent 32 x 24
    # the batch halves first (4, 2, 1) at the same tile; only then the tile halves
    assert tried[:3] == [((16, 16), 4), ((16, 16), 2), ((16, 16), 1)], tried
    assert tried[-1] == ((8, 8), 1)
    assert result.plan.unet.tile_size == (8, 8) and result.plan.unet.tiled
    assert sum("UNet out of memory" in note for note in result.notes) == len(tried) - 1


def test_smallest_tile_failing_fails_the_image_clearly(pipeline, monkeypatch):
    refuse_above(monkeypatch, "decode", 0)
    with pytest.raises(OutOfMemoryError, match="out of memory in the VAE decoder even at tile"):
        pipeline.upscale(noise_image(40, 32, 3), OPTIONS)


def test_other_errors_are_not_taken_for_memory(pipeline, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(vae_module, "decode", broken)
    with pytest.raises(ValueError, match="a bug"):
        pipeline.upscale(noise_image(40, 32, 4), OPTIONS)


@pytest.fixture(scope="module")
def bf16_pipeline(tiny_base, pisa_pkl):
    return load_pipeline(
        weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu", dtype="bf16"
    )


def test_non_finite_vae_output_is_redone_in_fp32_and_said_once(bf16_pipeline, caplog):
    decoder_out = bf16_pipeline.vae.decoder.conv_out

    def poison(module, args, output):
        return output * float("nan") if output.dtype != torch.float32 else output

    handle = decoder_out.register_forward_hook(poison)
    try:
        with caplog.at_level(logging.WARNING, logger="pisa_cli"):
            first = bf16_pipeline.upscale_with_info(noise_image(40, 32, 5), OPTIONS)
            second = bf16_pipeline.upscale_with_info(noise_image(40, 32, 6), OPTIONS)
    finally:
        handle.remove()
    for result in (first, second):
        assert "VAE decoder gave inf/NaN in bfloat16; redone in fp32" in result.notes
        assert np.asarray(result.image).std() > 0  # a real image, not NaN garbage
    warnings = [r for r in caplog.records if "inf/NaN" in r.getMessage()]
    assert len(warnings) == 1
    assert next(bf16_pipeline.vae.parameters()).dtype == torch.bfloat16
