"""Memory estimates, and tile sizes chosen from them.

The constants are peak bytes per activation value, measured on the SD 2.1-base architecture
(random weights, torch's CPU allocator; `pisa bench` re-measures them) and rounded up. They
scale with the width of each network, so they hold for smaller SD-shaped models too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

UNET_PEAK = 64
"""UNet: peak live values per (sample x latent pixel x first-level channel)."""
DECODER_PEAK = 10
"""Untiled VAE decoder: peak live values per (output pixel x first-level channel)."""
ENCODER_PEAK = 6
"""Untiled VAE encoder: peak live values per (input pixel x first-level channel)."""
BAND_PEAK = 40
"""Tiled VAE: live values at peak, in units of the band budget."""
RAM_STORE_PLANES = 3
"""Tiled VAE with a RAM store: whole-image planes alive at once at the top resolution."""
SAFETY = 0.6
"""Share of the free memory a plan may use."""
REFERENCE_LATENT_TILE = 96
"""The reference's UNet tile: auto never goes above it (quality is tuned at this size)."""
MIN_LATENT_TILE = 16
MIN_VAE_TILE = 8
"""Smallest decoder tile in latent pixels (the encoder's is 8x that in image pixels)."""
MAX_TILE_BATCH = 8
INDEX_LIMIT = 2**31
"""Elements a tensor may hold for torch's GPU kernels that index in 32 bits (convolution,
GroupNorm, upsampling): a larger one fails ("input tensor must fit into 32-bit index
math") or, for some kernels, is computed wrongly."""


@dataclass(frozen=True)
class Widths:
    """Channel widths of the networks' first level, which dominate activation memory."""

    unet: int = 320
    vae: int = 128
    vae_factor: int = 8


def unet_tile_bytes(tile_h: int, tile_w: int, width: int, dtype_bytes: int) -> int:
    """Peak activation bytes of one UNet sample on a tile_h x tile_w latent tile."""
    return UNET_PEAK * tile_h * tile_w * width * dtype_bytes


def auto_tile_batch(
    tiles: int, variants: int, per_sample: int, free_bytes: int, cap: int = MAX_TILE_BATCH
) -> int:
    """Tiles per UNet call that fit in a share of ``free_bytes`` (each tile runs once per
    variant in the same call); at least 1, at most ``cap`` and ``tiles``."""
    fit = int(free_bytes * SAFETY // max(1, per_sample * variants))
    return max(1, min(tiles, cap, fit))


def auto_latent_tile(free_bytes: int, widths: Widths, dtype_bytes: int, variants: int) -> int:
    """The reference's 96 when one tile (all variants) fits, else the largest that does."""
    tile = REFERENCE_LATENT_TILE
    while tile > MIN_LATENT_TILE:
        if unet_tile_bytes(tile, tile, widths.unet, dtype_bytes) * variants <= free_bytes * SAFETY:
            break
        tile //= 2
    return max(tile, MIN_LATENT_TILE)


def decoder_untiled_bytes(latent_h: int, latent_w: int, widths: Widths, dtype_bytes: int) -> int:
    pixels = latent_h * latent_w * widths.vae_factor**2
    return DECODER_PEAK * pixels * widths.vae * dtype_bytes


def encoder_untiled_bytes(height: int, width: int, widths: Widths, dtype_bytes: int) -> int:
    return ENCODER_PEAK * height * width * widths.vae * dtype_bytes


def largest_vae_tensor(height: int, width: int, widths: Widths, decoder: bool) -> int:
    """Elements of the largest activation of an untiled VAE pass on one height x width
    image: the decoder's up block before the last runs twice the first-level width at full
    resolution (256 channels in SD 2.1's VAE), the encoder the first-level width."""
    return (2 if decoder else 1) * widths.vae * height * width


def index_safe_tile(widths: Widths) -> int:
    """A tile side (image pixels) whose bands stay far inside INDEX_LIMIT (a band holds
    about 4 x budget values at most, the budget of a tile x tile image's activations)."""
    return math.isqrt(INDEX_LIMIT // (4 * widths.vae))


def band_budget(tile_pixels: int, widths: Widths) -> int:
    """Activation values one band may hold for a tile of ``tile_pixels`` image pixels."""
    return widths.vae * tile_pixels


def banded_bytes(budget: int, dtype_bytes: int) -> int:
    return BAND_PEAK * budget * dtype_bytes


def ram_store_bytes(height: int, width: int, widths: Widths, dtype_bytes: int) -> int:
    """Whole-image planes a RAM store holds at the top resolution (image pixels)."""
    return RAM_STORE_PLANES * height * width * widths.vae * dtype_bytes


def auto_vae_tile(
    untiled_bytes: int, image_pixels: int, widths: Widths, dtype_bytes: int, free_bytes: int
) -> int | None:
    """None (no tiling) when the untiled pass fits, else the largest tile side in image
    pixels whose bands fit, at least MIN_VAE_TILE latent pixels."""
    allowed = free_bytes * SAFETY
    if untiled_bytes <= allowed:
        return None
    side = math.isqrt(max(1, image_pixels))
    floor = MIN_VAE_TILE * widths.vae_factor
    while side > floor and banded_bytes(band_budget(side * side, widths), dtype_bytes) > allowed:
        side //= 2
    return max(side, floor)
