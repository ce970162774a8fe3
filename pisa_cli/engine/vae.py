"""VAE encode and decode between images in [-1, 1] and scaled latents, whole or tiled."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from pisa_cli.engine import memory
from pisa_cli.engine.planes import PlaneStore
from pisa_cli.engine.tiled_vae import BandRunner, decode_tiled, encode_tiled

Store = Literal["ram", "disk", "-"]
"""Where a tiled VAE keeps whole-image activations: RAM, a temporary file, or - (not
tiled)."""


def scaling_factor(vae: nn.Module) -> float:
    return float(vae.config.scaling_factor)  # type: ignore[union-attr]


def channels_last(vae: nn.Module) -> bool:
    """Whether the VAE's convolution weights are in channels-last layout."""
    weight = vae.decoder.conv_in.weight  # type: ignore[union-attr]
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _layout(x: torch.Tensor, vae: nn.Module) -> torch.Tensor:
    # oneDNN converts every input to the weights' layout; doing it once here is cheaper.
    return x.contiguous(memory_format=torch.channels_last) if channels_last(vae) else x


def _runner(vae: nn.Module, tile_pixels: int, store: Store, device: torch.device) -> BandRunner:
    widths = memory.Widths(vae=int(vae.config.block_out_channels[0]))  # type: ignore[union-attr]
    return BandRunner(
        PlaneStore(store, "cpu"),
        device,
        next(vae.parameters()).dtype,
        memory.band_budget(tile_pixels, widths),
    )


def one_by_one(batch: torch.Tensor) -> bool:
    """Whether the samples of a batch run one after the other: on a CPU in bf16 or fp16 the
    kernels round differently with the batch size (a decoded pixel moved up to 0.03, four
    8-bit levels, between a batch of four and one alone), so there every image is computed
    alone and a batch never changes an output. fp32 and accelerators keep their batches."""
    return (
        batch.shape[0] > 1
        and batch.device.type == "cpu"
        and batch.dtype in (torch.bfloat16, torch.float16)
    )


def _whole(run, x: torch.Tensor) -> torch.Tensor:
    """``run`` over the batch ``x``, in one call or sample by sample (``one_by_one``)."""
    if not one_by_one(x):
        return run(x)
    return torch.cat([run(x[index : index + 1]) for index in range(x.shape[0])])


Generators = torch.Generator | list[torch.Generator | None] | None
"""The noise of --vae-sample: one generator, or one per image of a batch."""


def encode(
    vae: nn.Module,
    image: torch.Tensor,
    sample: bool = False,
    generator: Generators = None,
    tile: int | None = None,
    store: Store = "ram",
) -> torch.Tensor:
    """Scaled latents z_L of (N, 3, H, W) images in [-1, 1]: the mean, or a sample (with
    one generator per image, each image's noise is what it would be alone).

    ``tile`` (image pixels) encodes one image in bands holding at most a tile x tile
    image's activations; None encodes the whole images at once. Both give the same latent.
    """
    image = image.to(next(vae.parameters()).dtype)
    if tile is None:

        def run(x: torch.Tensor) -> torch.Tensor:
            return vae.encode(_layout(x, vae)).latent_dist.parameters  # type: ignore[operator]

        moments = _whole(run, image)
    else:
        moments = encode_tiled(vae, image, _runner(vae, tile * tile, store, image.device))
    mean, logvar = torch.chunk(_overflow_kept(moments), 2, dim=1)
    latent = mean
    if sample:
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        latent = mean + std * _noise(mean, generator)
    return latent * scaling_factor(vae)


def _noise(mean: torch.Tensor, generator: Generators) -> torch.Tensor:
    if not isinstance(generator, list):
        return torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    shape = (1, *mean.shape[1:])
    parts = [
        torch.randn(shape, generator=g, device=mean.device, dtype=mean.dtype) for g in generator
    ]
    return torch.cat(parts)


def decode(
    vae: nn.Module,
    latents: torch.Tensor,
    tile: int | None = None,
    store: Store = "ram",
    clamp: bool = True,
) -> torch.Tensor:
    """Images in [-1, 1] of scaled (N, 4, h, w) ``latents`` (clamped, as the reference does,
    unless ``clamp`` is False, as one family's reference code does; an overflow, inf, comes
    out NaN, never clamped into range).

    ``tile`` (latent pixels) decodes one latent in bands holding at most the activations of
    a tile x tile latent; None decodes the whole latents at once. Both give the same image.
    """
    latents = latents.to(next(vae.parameters()).dtype) / scaling_factor(vae)
    if tile is None:

        def run(x: torch.Tensor) -> torch.Tensor:
            return vae.decode(_layout(x, vae)).sample  # type: ignore[operator]

        image = _whole(run, latents)
    else:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)  # type: ignore[union-attr]
        side = tile * factor
        image = decode_tiled(vae, latents, _runner(vae, side * side, store, latents.device))
    image = _overflow_kept(image)
    return image.clamp_(-1, 1) if clamp else image


def _overflow_kept(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every inf made NaN, in place: the clamps after it would turn an overflow
    (inf) into a plausible +-1 (or a plausible variance); a NaN goes through them, so the
    finiteness check after a pass still sees it."""
    nan = float("nan")
    return x.nan_to_num_(nan=nan, posinf=nan, neginf=nan)
