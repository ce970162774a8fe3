"""Contact sheet and heat maps: each point in its place, axes labelled, the best marked."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pisa_cli.sweep.grid import GridPoint, LambdaGrid
from pisa_cli.sweep.sheet import (
    BACKGROUND,
    HIGHLIGHT,
    VIRIDIS,
    SheetOptions,
    cell_image,
    contact_sheet,
    heat_map,
)

GRID = LambdaGrid(pix=(0.0, 0.5, 1.0), sem=(0.0, 1.5))


def box_of(picture: Image.Image, colour) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the pixels of exactly ``colour``."""
    mask = np.all(np.asarray(picture) == np.array(colour, dtype=np.uint8), axis=-1)
    rows, cols = np.nonzero(mask)
    assert rows.size, f"{colour} not in the picture"
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def test_contact_sheet_puts_pix_across_and_sem_down():
    colours = {
        point: (40 + 60 * GRID.pix.index(point.pix), 30 + 90 * GRID.sem.index(point.sem), 7)
        for point in GRID.points
    }
    cells = {point: Image.new("RGB", (50, 40), colour) for point, colour in colours.items()}
    sheet = contact_sheet(cells, GRID, ["title", "settings"])
    boxes = {point: box_of(sheet, colour) for point, colour in colours.items()}
    for point, (left, top, right, bottom) in boxes.items():
        assert (right - left, bottom - top) == (50, 40), point
    for sem in GRID.sem:  # a row: same top, x grows with pix
        row = [boxes[GridPoint(pix, sem)] for pix in GRID.pix]
        assert len({box[1] for box in row}) == 1
        assert [box[0] for box in row] == sorted(box[0] for box in row)
    for pix in GRID.pix:  # a column: same left, y grows with sem
        column = [boxes[GridPoint(pix, sem)] for sem in GRID.sem]
        assert len({box[0] for box in column}) == 1 and column[0][1] < column[1][1]
    # Labels: ink left of the first column (lambda_sem values) and above the first row.
    first = boxes[GridPoint(0.0, 0.0)]
    array = np.asarray(sheet)
    assert (array[first[1] : first[3], : first[0] - 2] != BACKGROUND).any()
    assert (array[first[1] - 30 : first[1] - 2, first[0] : first[2]] != BACKGROUND).any()


@pytest.mark.parametrize(
    ("size", "options", "expected"),
    [
        ((600, 300), SheetOptions(cell=200), (200, 100)),
        ((100, 80), SheetOptions(cell=200), (100, 80)),  # never enlarged
        ((600, 300), SheetOptions(cell=128, crop=True), (128, 128)),
    ],
)
def test_cell_images(size, options, expected):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), np.uint8))
    cell = cell_image(image, options)
    assert cell.size == expected
    if options.crop:  # 1:1 pixels from the centre
        left, top = (size[0] - 128) // 2, (size[1] - 128) // 2
        assert np.array_equal(
            np.asarray(cell), np.asarray(image)[top : top + 128, left : left + 128]
        )


@pytest.mark.parametrize("lower_is_better", [False, True])
def test_heat_map_marks_the_best_point(lower_is_better):
    values = {point: point.pix * 10 + point.sem for point in GRID.points}
    best = min(values, key=values.get) if lower_is_better else max(values, key=values.get)
    picture = heat_map(values, GRID, ["psnr"], lower_is_better, best)
    # a red outline around one cell, filled with the bright end of the colour map
    left, top, right, bottom = box_of(picture, HIGHLIGHT)
    assert 40 < right - left < 200 and 40 < bottom - top < 60
    assert picture.getpixel((left + 5, top + 5)) == VIRIDIS[-1]
    # the worst value's cell has the dark end (more of it than the colour bar's last line)
    dark = np.all(np.asarray(picture) == np.array(VIRIDIS[0], dtype=np.uint8), axis=-1)
    assert dark.sum() > 1000


def test_sheet_cell_option_is_checked():
    from pisa_cli.errors import OptionsError

    with pytest.raises(OptionsError, match="--sheet-cell 8 must be from 32 to 4096"):
        SheetOptions(cell=8)
