"""Rough memory estimates, used to choose how many tiles go through the UNet at once."""

from __future__ import annotations

ACTIVATION_FACTOR = 24
"""Live activation tensors of the widest UNet level at peak, per sample (a safe estimate)."""
MEMORY_SHARE = 0.5
"""Share of the free memory one UNet call may plan to use."""
MAX_TILE_BATCH = 8


def unet_tile_bytes(tile_h: int, tile_w: int, width: int, dtype_bytes: int) -> int:
    """Estimated peak activation bytes of one UNet sample on a tile_h x tile_w latent tile.

    ``width`` is the channel count of the UNet's first level (320 for SD 2.1), which runs at
    the full tile resolution and dominates the activations.
    """
    return ACTIVATION_FACTOR * tile_h * tile_w * width * dtype_bytes


def auto_tile_batch(
    tiles: int, variants: int, per_sample: int, free_bytes: int, cap: int = MAX_TILE_BATCH
) -> int:
    """How many tiles per UNet call fit in a share of ``free_bytes`` (each tile runs once per
    variant in the same call); at least 1, at most ``cap`` and ``tiles``."""
    budget = free_bytes * MEMORY_SHARE
    fit = int(budget // max(1, per_sample * variants))
    return max(1, min(tiles, cap, fit))
