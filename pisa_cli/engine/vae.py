"""VAE encode and decode between images in [-1, 1] and scaled latents, whole or tiled."""

from __future__ import annotations

import torch
from torch import nn

from pisa_cli.engine import memory
from pisa_cli.engine.planes import PlaneStore
from pisa_cli.engine.tiled_vae import BandRunner, decode_tiled, encode_tiled


def scaling_factor(vae: nn.Module) -> float:
    return float(vae.config.scaling_factor)  # type: ignore[union-attr]


def channels_last(vae: nn.Module) -> bool:
    """Whether the VAE's convolution weights are in channels-last layout."""
    weight = vae.decoder.conv_in.weight  # type: ignore[union-attr]
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _layout(x: torch.Tensor, vae: nn.Module) -> torch.Tensor:
    # oneDNN converts every input to the weights' layout; doing it once here is cheaper.
    return x.contiguous(memory_format=torch.channels_last) if channels_last(vae) else x


def _runner(vae: nn.Module, tile_pixels: int, store: str, device: torch.device) -> BandRunner:
    widths = memory.Widths(vae=int(vae.config.block_out_channels[0]))  # type: ignore[union-attr]
    return BandRunner(
        PlaneStore(store, "cpu"),
        device,
        next(vae.parameters()).dtype,
        memory.band_budget(tile_pixels, widths),
    )


def encode(
    vae: nn.Module,
    image: torch.Tensor,
    sample: bool = False,
    generator: torch.Generator | None = None,
    tile: int | None = None,
    store: str = "ram",
) -> torch.Tensor:
    """Scaled latent z_L of a (1, 3, H, W) image in [-1, 1]: the mean, or a sample.

    ``tile`` (image pixels) encodes in bands holding at most a tile x tile image's
    activations; None encodes the whole image at once. Both give the same latent.
    """
    image = image.to(next(vae.parameters()).dtype)
    if tile is None:
        moments = vae.encode(_layout(image, vae)).latent_dist.parameters  # type: ignore[operator]
    else:
        moments = encode_tiled(vae, image, _runner(vae, tile * tile, store, image.device))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    latent = mean
    if sample:
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        latent = mean + std * noise
    return latent * scaling_factor(vae)


def decode(
    vae: nn.Module, latents: torch.Tensor, tile: int | None = None, store: str = "ram"
) -> torch.Tensor:
    """Image in [-1, 1] of scaled ``latents`` (clamped, as the reference does).

    ``tile`` (latent pixels) decodes in bands holding at most the activations of a tile x
    tile latent; None decodes the whole latent at once. Both give the same image.
    """
    latents = latents.to(next(vae.parameters()).dtype) / scaling_factor(vae)
    if tile is None:
        image = vae.decode(_layout(latents, vae)).sample  # type: ignore[operator]
    else:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)  # type: ignore[union-attr]
        side = tile * factor
        image = decode_tiled(vae, latents, _runner(vae, side * side, store, latents.device))
    return image.clamp_(-1, 1)
