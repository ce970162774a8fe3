"""Tile geometry: the reference's grid, any aspect ratio, full coverage with positive weight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pisa_cli.engine.tiles import axis_origins, gaussian_weights, plan_latent_tiles


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
