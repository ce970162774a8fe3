"""Tile geometry, kept in one place: where tiles go and how much each one counts.

Pure arithmetic on sizes; the only tensor made here is the Gaussian weight of a tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

import torch


@dataclass(frozen=True)
class Tile:
    """A rectangle of a 2-D grid: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.width)


@dataclass(frozen=True)
class TilePlan:
    """Tiles covering a ``height`` x ``width`` grid, all of the same size."""

    height: int
    width: int
    tiles: tuple[Tile, ...]
    y_shift: float = 0.0
    """Where the Gaussian weight of a tile peaks along y, past the middle row (L - 1) / 2:
    0 for StableSR's grid, 0.5 for the square grid (its y centre is L / 2)."""

    def __post_init__(self) -> None:
        if not self.tiles:
            raise ValueError("a tile plan needs at least one tile")

    @property
    def tiled(self) -> bool:
        """False when one tile covers the whole grid."""
        return len(self.tiles) > 1

    @property
    def tile_size(self) -> tuple[int, int]:
        return self.tiles[0].height, self.tiles[0].width

    @property
    def waste(self) -> float:
        """Pixels processed over pixels in the grid (1.0: no overlap)."""
        processed = sum(tile.height * tile.width for tile in self.tiles)
        return processed / (self.height * self.width)


def axis_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Start of each tile along one axis of length ``size``.

    Tiles start at 0, tile - overlap, 2 (tile - overlap), ... while they end inside; the last
    one sits flush with the far edge (origin size - tile). An axis shorter than the tile gets
    one tile of its own length.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    return [i * stride for i in range(count - 1)] + [size - tile]


def plan_latent_tiles(height: int, width: int, tile: int, overlap: int) -> TilePlan:
    """The UNet tile plan for a ``height`` x ``width`` latent (REFERENCE section 5).

    As in the reference, a latent of at most ``tile * tile`` pixels is not tiled at all.
    Beyond that the grid of :func:`axis_origins` is used on each axis; an axis shorter than
    the tile gets tiles of its own length, so any aspect ratio works.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"latent size must be positive, got {height}x{width}")
    if height * width <= tile * tile:
        return TilePlan(height, width, (Tile(0, 0, height, width),))
    tile_h, tile_w = min(tile, height), min(tile, width)
    tiles = tuple(
        Tile(top, left, tile_h, tile_w)
        for top in axis_origins(height, tile_h, min(overlap, tile_h - 1))
        for left in axis_origins(width, tile_w, min(overlap, tile_w - 1))
    )
    return TilePlan(height, width, tiles)


def plan_square_tiles(height: int, width: int, tile: int, overlap: int) -> TilePlan:
    """The square tile plan of REFERENCE section 9's script: square tiles of side
    min(tile, height, width) on the grid of :func:`axis_origins`, Gaussian peak half a row
    below the middle. Untiled up to ``tile * tile`` latent pixels, as in section 5.

    Its script keeps the overlap when the short side clips the tile, and loops forever
    once the tile is no longer than the overlap; we clip the overlap to side - 1 instead.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"latent size must be positive, got {height}x{width}")
    if height * width <= tile * tile:
        return TilePlan(height, width, (Tile(0, 0, height, width),))
    side = min(tile, height, width)
    overlap = min(overlap, side - 1)
    tiles = tuple(
        Tile(top, left, side, side)
        for top in axis_origins(height, side, overlap)
        for left in axis_origins(width, side, overlap)
    )
    return TilePlan(height, width, tiles, y_shift=0.5)


Tiling = Literal["stablesr", "square", "windows"]
"""How a family tiles: StableSR's latent grid (REFERENCE section 5), the square grid of
section 9, or one Gaussian window grid for all three stages (section 10, its own planner)."""
TILINGS: tuple[Tiling, ...] = get_args(Tiling)


def plan_tiles(height: int, width: int, tile: int, overlap: int, tiling: str) -> TilePlan:
    """The tile plan of ``tiling`` (one of TILINGS)."""
    if tiling == "square":
        return plan_square_tiles(height, width, tile, overlap)
    if tiling != "stablesr":
        raise ValueError(f"unknown tiling {tiling!r}")
    return plan_latent_tiles(height, width, tile, overlap)


@lru_cache(maxsize=16)
def _gaussian_1d(length: int, shift: float = 0.0) -> torch.Tensor:
    index = torch.arange(length, dtype=torch.float64)
    middle = (length - 1) / 2 + shift
    sigma = 0.1 * length
    return torch.exp(-((index - middle) ** 2) / (2 * sigma**2))


def gaussian_weights(height: int, width: int, y_shift: float = 0.0) -> torch.Tensor:
    """(height, width) float32 weight of a tile: the outer product of two Gaussians.

    g(i) = exp(-(i - (L-1)/2 - shift)^2 / (2 (0.1 L)^2)) along an axis of length L (the
    shift is ``y_shift`` along y, 0 along x): 1 in the middle, about 4e-6 at the border,
    never zero.
    """
    return torch.outer(_gaussian_1d(height, y_shift), _gaussian_1d(width)).to(torch.float32)
