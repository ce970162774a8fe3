"""Tile geometry: the reference's grid, any aspect ratio, full coverage with positive weight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pisa_cli.engine.tiles import (
    axis_origins,
    gaussian_weights,
    plan_latent_tiles,
    plan_square_tiles,
)


def reference_origins(size: int, tile: int, overlap: int) -> list[int]:
    """The reference's while loop, written out: count tiles, last one flush."""
    count, cur = 0, 0
    while cur < size:
        cur = max(count * tile - overlap * count, 0) + tile
        count += 1
    return [size - tile if i == count - 1 else i * (tile - overlap) for i in range(count)]


@pytest.mark.parametrize(
    ("size", "tile", "overlap"),
    [(100, 96, 32), (128, 96, 32), (160, 96, 32), (257, 96, 32), (300, 64, 0)],
)
def test_origins_match_the_reference_loop(size, tile, overlap):
    assert axis_origins(size, tile, overlap) == reference_origins(size, tile, overlap)


def test_origins_examples():
    assert axis_origins(96, 96, 32) == [0]
    assert axis_origins(50, 96, 32) == [0]
    assert axis_origins(200, 96, 32) == [0, 64, 104]


def test_small_latent_is_not_tiled():
    plan = plan_latent_tiles(96, 96, 96, 32)
    assert not plan.tiled and plan.tiles[0].height == 96
    # area rule: 128 x 64 <= 96 x 96, so one pass like the reference
    assert not plan_latent_tiles(128, 64, 96, 32).tiled


def test_wide_latent_gets_short_tiles():
    # 2048 x 512 output = 256 x 64 latent: the reference crashes here
    plan = plan_latent_tiles(64, 256, 96, 32)
    assert plan.tiled
    assert plan.tile_size == (64, 96)
    assert [t.left for t in plan.tiles] == [0, 64, 128, 160]
    assert plan.waste == pytest.approx(4 * 96 / 256)


def test_gaussian_weights_shape_and_range():
    weights = gaussian_weights(96, 64)
    assert weights.shape == (96, 64)
    assert weights.max() <= 1 and weights.min() > 0
    middle = (95 / 2, 63 / 2)
    g = torch.exp(-((torch.arange(96.0) - middle[0]) ** 2) / (2 * 9.6**2))
    assert torch.allclose(weights[:, 0] / weights[:, 0].max(), g / g.max(), atol=1e-6)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(1, 400),
    width=st.integers(1, 400),
    tile=st.integers(8, 128),
    overlap_share=st.floats(0, 0.95),
)
def test_every_latent_pixel_is_covered_with_positive_weight(height, width, tile, overlap_share):
    overlap = min(tile - 1, int(tile * overlap_share))
    plan = plan_latent_tiles(height, width, tile, overlap)
    total = torch.zeros(height, width, dtype=torch.float32)
    for t in plan.tiles:
        assert t.top >= 0 and t.top + t.height <= height
        assert t.left >= 0 and t.left + t.width <= width
        total[t.rows, t.cols] += gaussian_weights(t.height, t.width)
    assert bool((total > 0).all())


def _official_origins(h: int, w: int, tile: int, overlap: int) -> set[tuple[int, int]]:
    """The OMGSR-S script's tile loop (x-major, last tile flush), as (top, left)."""
    tile = min(tile, h, w)
    rows, cur = 0, 0
    while cur < w:
        cur = max(rows * tile - overlap * rows, 0) + tile
        rows += 1
    cols, cur = 0, 0
    while cur < h:
        cur = max(cols * tile - overlap * cols, 0) + tile
        cols += 1
    origins = set()
    for row in range(rows):
        for col in range(cols):
            x = w - tile if row == rows - 1 else max(row * tile - overlap * row, 0)
            y = h - tile if col == cols - 1 else max(col * tile - overlap * col, 0)
            origins.add((y, x))
    return origins


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap"),
    [(12, 10, 8, 4), (64, 200, 64, 32), (50, 200, 64, 32), (8, 26, 12, 4), (90, 64, 64, 32)],
)
def test_square_tiles_follow_the_omgsr_script(h, w, tile, overlap):
    plan = plan_square_tiles(h, w, tile, overlap)
    side = min(tile, h, w)
    assert {(t.top, t.left) for t in plan.tiles} == _official_origins(h, w, tile, overlap)
    assert {(t.height, t.width) for t in plan.tiles} == {(side, side)}
    assert plan.y_shift == 0.5


def test_square_tiles_clip_an_overlap_the_script_would_loop_on():
    plan = plan_square_tiles(6, 40, 8, 6)  # tile clipped to 6 = overlap: the script never ends
    assert {(t.height, t.width) for t in plan.tiles} == {(6, 6)}
    assert [t.left for t in plan.tiles] == list(range(35))


def test_omgsr_weights_peak_half_a_row_lower():
    shifted = gaussian_weights(8, 8, 0.5)
    assert torch.equal(shifted[:, 3], shifted[:, 4])  # x centre (L - 1) / 2
    assert shifted[4, 3] == shifted.max() and torch.equal(shifted[3], shifted[5])  # y centre L / 2
    centred = gaussian_weights(8, 8)
    assert torch.equal(centred[3], centred[4]) and not torch.equal(shifted, centred)
