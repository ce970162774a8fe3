"""The tiled VAE gives the untiled result: whole-image GroupNorm, exact halos, any size."""

from __future__ import annotations

import pytest
import torch

from pisa_cli.engine.planes import PlaneStore, RamPlane
from pisa_cli.engine.tiled_vae import BandRunner, decode_tiled, encode_tiled
from pisa_cli.engine.vae import decode, encode
from pisa_cli.models.base import load_part


@pytest.fixture(scope="module")
def vae(tiny_base):
    return load_part(tiny_base, "vae").eval()


def runner(budget: int, kind: str = "ram", dtype=torch.float32) -> BandRunner:
    return BandRunner(PlaneStore(kind), torch.device("cpu"), dtype, budget)


@pytest.mark.parametrize(
    ("latent_size", "budget", "store"),
    [
        ((12, 20), 100_000, "ram"),  # a few bands
        ((12, 20), 3_000, "ram"),  # one row per band at the top level
        ((13, 7), 5_000, "disk"),  # odd sizes, bands that do not divide the image
        ((9, 31), 17_777, "disk"),
    ],
)
def test_tiled_decode_equals_untiled(vae, latent_size, budget, store):
    z = torch.randn(1, 4, *latent_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = vae.decode(z).sample
        tiled = decode_tiled(vae, z, runner(budget, store))
    assert tiled.shape == expected.shape
    assert (tiled - expected).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("size", "budget", "store"),
    [((96, 160), 50_000, "ram"), ((104, 56), 4_000, "disk"), ((64, 200), 9_999, "ram")],
)
def test_tiled_encode_equals_untiled(vae, size, budget, store):
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        expected = vae.encode(image).latent_dist.parameters
        tiled = encode_tiled(vae, image, runner(budget, store))
    assert tiled.shape == expected.shape
    assert (tiled - expected).abs().max() < 1e-4


def test_group_norm_uses_whole_image_statistics(vae):
    """Per-band statistics would differ visibly: a latent whose two halves differ a lot is
    where diffusers' per-tile GroupNorm shows its tone shift."""
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    z[:, :, 8:] = z[:, :, 8:] * 4 + 3
    with torch.inference_mode():
        expected = vae.decode(z).sample
        tiled = decode_tiled(vae, z, runner(2_000))
        saved = vae.tile_sample_min_size, vae.tile_latent_min_size
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
        try:
            per_tile = vae.decode(z).sample
        finally:
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = saved
    assert (tiled - expected).abs().max() < 1e-4
    assert (per_tile - expected).abs().max() > 1e-2  # what we avoid


def test_tile_api_in_pixels_and_latent_pixels(vae):
    z = torch.randn(1, 4, 10, 14, generator=torch.Generator().manual_seed(4))
    image = torch.rand(1, 3, 80, 112, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.inference_mode():
        assert (decode(vae, z, tile=4) - decode(vae, z)).abs().max() < 1e-4
        assert (decode(vae, z, tile=4, store="disk") - decode(vae, z)).abs().max() < 1e-4
        assert (encode(vae, image, tile=32) - encode(vae, image)).abs().max() < 1e-4


def test_disk_planes_round_trip_and_clean_up(tmp_path):
    store = PlaneStore("disk", folder=tmp_path)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        plane = store.new(3, 5, 7, dtype)
        data = torch.randn(3, 5, 7).to(dtype)
        plane.write(0, data[:, :2])
        plane.write(2, data[:, 2:])
        assert torch.equal(plane.read(0, 5, torch.device("cpu")), data)
        assert torch.equal(plane.read(-1, 3, torch.device("cpu")), data[:, :3])
        assert torch.allclose(plane.sums, data.double().sum((1, 2)), atol=1e-6)
        plane.release()
    assert list(tmp_path.iterdir()) == []


def test_wrapped_input_is_not_released():
    tensor = torch.ones(1, 2, 3, 4)
    plane = RamPlane.wrap(tensor)
    plane.release()
    assert torch.equal(plane.read(0, 3, torch.device("cpu")), tensor[0])


def test_fused_attention_with_log_sum_exp_matches_plain_attention():
    from pisa_cli.engine.tiled_vae import attend, attend_reference

    generator = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 50, 8, generator=generator)
    # strided keys and values, as the band runner makes them
    k = torch.randn(1, 2, 8, 70, generator=generator).transpose(2, 3)
    v = torch.randn(1, 2, 8, 70, generator=generator).transpose(2, 3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * 0.3
    for function in (attend, attend_reference):
        out, lse = function(q, k, v, 0.3)
        assert torch.allclose(out, expected, atol=1e-5)
        assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)


def test_attention_without_a_fused_kernel_gives_the_same_decode(vae, monkeypatch):
    import pisa_cli.engine.tiled_vae as tiled

    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(tiled, "SCORE_BUDGET", 1000)  # many query chunks
    monkeypatch.setattr(tiled, "attend", tiled.attend_reference)
    with torch.inference_mode():
        expected = vae.decode(z).sample
        out = decode_tiled(vae, z, runner(3_000))
    assert (out - expected).abs().max() < 1e-4


def test_channels_last_vae_gives_the_same_images(tiny_base):
    contiguous = load_part(tiny_base, "vae").eval()
    last = load_part(tiny_base, "vae").eval().to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, 12, 9, generator=torch.Generator().manual_seed(8))
    image = torch.rand(1, 3, 64, 56, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.inference_mode():
        expected = decode(contiguous, z)
        assert (decode(last, z) - expected).abs().max() < 1e-4
        assert (decode(last, z, tile=4) - expected).abs().max() < 1e-4
        assert (encode(last, image, tile=32) - encode(contiguous, image)).abs().max() < 1e-4
