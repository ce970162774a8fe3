"""The one-step prediction: eps of the UNet over latent tiles, and the lambda combination.

REFERENCE section 3: eps = (lambda_pix - lambda_sem) eps_pix + lambda_sem eps_pisa and
z_H = z_L - eps. The pixel and PiSA eps are aggregated over tiles separately (Gaussian
weights, REFERENCE section 5), so every lambda pair, and the sweep, share the same passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pisa_cli.engine.tiles import Tile, TilePlan, gaussian_weights

UNetFn = Callable[..., torch.Tensor]
"""(latent tiles (N, C, h, w), prompt embedding, variants, timestep=t) -> eps, variant-major."""


def variants_needed(lambda_pix: float, lambda_sem: float) -> tuple[str, ...]:
    """The UNet weight sets one lambda pair needs: one pass when the formula allows it."""
    if lambda_sem == 0:
        return ("pix",)
    if lambda_pix == lambda_sem:
        return ("pisa",)
    return ("pix", "pisa")


def combine_eps(eps: dict[str, torch.Tensor], lambda_pix: float, lambda_sem: float) -> torch.Tensor:
    """eps for (lambda_pix, lambda_sem) from the per-variant eps, using what is there."""
    if "pix" in eps and "pisa" in eps:
        return (lambda_pix - lambda_sem) * eps["pix"] + lambda_sem * eps["pisa"]
    if "pisa" in eps and lambda_pix == lambda_sem:
        return lambda_sem * eps["pisa"]
    if "pix" in eps and lambda_sem == 0:
        return lambda_pix * eps["pix"]
    raise ValueError(f"eps of {sorted(eps)} cannot give lambdas ({lambda_pix}, {lambda_sem})")


def x0_from_eps(latents: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """One DDPM step to the clean latent at a timestep with cumulative alpha ``alpha_bar``:
    z_H = (z_L - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (REFERENCE section 7)."""
    return (latents - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def predict_eps(
    unet: UNetFn,
    latents: torch.Tensor,
    cond: torch.Tensor,
    plan: TilePlan,
    variants: Sequence[str],
    tile_batch: int = 1,
    timestep: int = 1,
    pad: bool = False,
) -> dict[str, torch.Tensor]:
    """eps of each variant for the (N, C, H, W) ``latents`` (N images of one size), tile by
    tile: (N, C, H, W) float32 per variant.

    ``pad``: fill a short last batch up to ``tile_batch`` with copies of its last sample
    (their eps is dropped), so every call has one shape: a compiled UNet then compiles
    once instead of once per batch size.

    Tiles go through the UNet ``tile_batch`` at a time, taken in order from every image (a
    call can hold the last tiles of one image and the first of the next), all variants in
    the same call; an untiled image is one tile. The result of a tiled plan is
    sum(w * eps_tile) / sum(w) with Gaussian tile weights, accumulated in float32, each
    image's tiles in the same order whatever shares their calls.
    """
    tile_batch = max(1, tile_batch)
    count = latents.shape[0]
    if not plan.tiled:
        outs = []
        for start in range(0, count, tile_batch):
            chunk = latents[start : start + tile_batch]
            size = tile_batch if pad else chunk.shape[0]
            out = unet(_filled(chunk, size), cond, variants, timestep=timestep).float()
            outs.append(out.unflatten(0, (len(variants), size))[:, : chunk.shape[0]])
        eps = torch.cat(outs, dim=1)
        return {v: eps[k] for k, v in enumerate(variants)}
    _, channels, height, width = latents.shape
    sums = {v: torch.zeros(count, channels, height, width, device=latents.device) for v in variants}
    norm = torch.zeros(1, 1, height, width, device=latents.device)
    weight = gaussian_weights(*plan.tile_size, plan.y_shift).to(latents.device)
    for tile in plan.tiles:
        norm[0, 0, tile.rows, tile.cols] += weight
    work: list[tuple[int, Tile]] = [(i, tile) for i in range(count) for tile in plan.tiles]
    for start in range(0, len(work), tile_batch):
        group = work[start : start + tile_batch]
        batch = torch.cat([latents[i : i + 1, :, t.rows, t.cols] for i, t in group])
        size = tile_batch if pad else len(group)
        out = unet(_filled(batch, size), cond, variants, timestep=timestep).float()
        for index, (image, tile) in enumerate(group):
            for k, variant in enumerate(variants):
                eps_tile = out[k * size + index]
                sums[variant][image, :, tile.rows, tile.cols] += eps_tile * weight
    return {v: total / norm for v, total in sums.items()}


def _filled(batch: torch.Tensor, size: int) -> torch.Tensor:
    """``batch`` with copies of its last sample appended up to ``size`` samples."""
    missing = size - batch.shape[0]
    if missing <= 0:
        return batch
    return torch.cat([batch, batch[-1:].expand(missing, *batch.shape[1:])])
