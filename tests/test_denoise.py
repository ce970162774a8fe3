"""The lambda combination and the tiled UNet aggregation."""

from __future__ import annotations

import pytest
import torch

from pisa_cli.engine.denoise import combine_eps, predict_eps, variants_needed
from pisa_cli.engine.tiles import plan_latent_tiles
from pisa_cli.models.base import load_part
from pisa_cli.models.checkpoint import load_checkpoint
from pisa_cli.models.lora import PisaUNet, checkpoint_adapters


@pytest.mark.parametrize(
    ("lambdas", "variants"),
    [
        ((1.0, 1.0), ("pisa",)),
        ((0.5, 0.5), ("pisa",)),
        ((1.0, 0.0), ("pix",)),
        ((0.0, 0.0), ("pix",)),
        ((1.0, 0.5), ("pix", "pisa")),
        ((0.2, 1.5), ("pix", "pisa")),
    ],
)
def test_one_pass_when_the_formula_allows(lambdas, variants):
    assert variants_needed(*lambdas) == variants


def test_combination_formula():
    eps = {"pix": torch.tensor([2.0]), "pisa": torch.tensor([5.0])}
    # lambda_pix * eps_pix + lambda_sem * (eps_pisa - eps_pix)
    assert combine_eps(eps, 0.7, 1.3).item() == pytest.approx(0.7 * 2 + 1.3 * 3)


@pytest.fixture(scope="module")
def unet(tiny_base, pisa_pkl):
    return PisaUNet(
        load_part(tiny_base, "unet"), checkpoint_adapters(load_checkpoint(pisa_pkl)), merged="pix"
    )


@pytest.fixture(scope="module")
def latent():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(1, 4, 20, 28, generator=generator), torch.randn(
        1, 77, 16, generator=generator
    )


@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (0.6, 0.6), (1.0, 0.0), (0.8, 0.0)])
def test_one_pass_shortcuts_equal_the_two_pass_formula(unet, latent, lambdas):
    z, cond = latent
    plan = plan_latent_tiles(20, 28, 96, 32)
    with torch.no_grad():
        both = predict_eps(unet, z, cond, plan, ("pix", "pisa"))
        one = predict_eps(unet, z, cond, plan, variants_needed(*lambdas))
    assert torch.allclose(combine_eps(one, *lambdas), combine_eps(both, *lambdas), atol=1e-5)


def test_untiled_plan_is_one_plain_call(unet, latent):
    z, cond = latent
    plan = plan_latent_tiles(20, 28, 28, 8)  # 20 * 28 <= 28 * 28: not tiled
    with torch.no_grad():
        planned = predict_eps(unet, z, cond, plan, ("pisa",))["pisa"]
        direct = unet(z, cond, ("pisa",))
    assert torch.equal(planned, direct)


def test_pointwise_model_is_unchanged_by_tiling(latent):
    """Gaussian aggregation is a weighted mean: a model without spatial context must give
    exactly the untiled result, whatever the tiles."""
    z, cond = latent

    def pointwise(batch, cond, variants, timestep=1):
        return torch.cat([torch.tanh(batch) * (k + 1) for k in range(len(variants))])

    untiled = predict_eps(pointwise, z, cond, plan_latent_tiles(20, 28, 96, 32), ("pix", "pisa"))
    for tile, overlap, batch in [(8, 3, 1), (12, 4, 5), (16, 0, 2), (9, 8, 3)]:
        plan = plan_latent_tiles(20, 28, tile, overlap)
        assert plan.tiled
        tiled = predict_eps(pointwise, z, cond, plan, ("pix", "pisa"), tile_batch=batch)
        for variant in ("pix", "pisa"):
            assert torch.allclose(tiled[variant], untiled[variant], atol=1e-6)


def test_tile_batch_does_not_change_the_result(unet, latent):
    z, cond = latent
    plan = plan_latent_tiles(20, 28, 12, 4)
    calls = unet.calls
    with torch.no_grad():
        one = predict_eps(unet, z, cond, plan, ("pix", "pisa"), tile_batch=1)
        many = predict_eps(unet, z, cond, plan, ("pix", "pisa"), tile_batch=4)
    tiles = len(plan.tiles)
    assert unet.calls - calls == tiles + -(-tiles // 4)  # both variants share each call
    for variant in ("pix", "pisa"):
        assert torch.allclose(one[variant], many[variant], atol=1e-5)
