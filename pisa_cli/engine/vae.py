"""VAE encode and decode between images in [-1, 1] and scaled latents."""

from __future__ import annotations

import torch
from torch import nn


def scaling_factor(vae: nn.Module) -> float:
    return float(vae.config.scaling_factor)  # type: ignore[union-attr]


def encode(
    vae: nn.Module,
    image: torch.Tensor,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scaled latent z_L of a (1, 3, H, W) image in [-1, 1]: the mean, or a sample."""
    image = image.to(vae.dtype)  # type: ignore[arg-type]
    dist = vae.encode(image).latent_dist  # type: ignore[operator]
    latent = dist.sample(generator=generator) if sample else dist.mean
    return latent * scaling_factor(vae)


def decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1] of scaled ``latents`` (clamped, as the reference does)."""
    latents = latents.to(vae.dtype) / scaling_factor(vae)  # type: ignore[arg-type]
    return vae.decode(latents).sample.clamp(-1, 1)  # type: ignore[operator]
