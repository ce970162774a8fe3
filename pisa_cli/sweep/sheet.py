"""Pictures of the lambda plane: the contact sheet of a sweep, and a heat map per metric.

Both lay the grid out the same way: lambda_pix grows left to right (columns), lambda_sem
top to bottom (rows), each axis labelled with its values. Drawn with Pillow alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from pisa_cli.sweep.grid import GridPoint, LambdaGrid

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
HIGHLIGHT = (230, 40, 40)
GAP = 6
PAD = 12
FONT_SIZE = 16
VIRIDIS = (
    (68, 1, 84),
    (59, 82, 139),
    (33, 145, 140),
    (94, 201, 98),
    (253, 231, 37),
)
"""Anchors of the viridis colour map (perceptually even, readable in grey and by most
colour-blind readers)."""


@dataclass(frozen=True)
class SheetOptions:
    """How the contact sheet shows each grid point."""

    cell: int = 256
    """Longest side of a cell in pixels."""
    crop: bool = False
    """Show a 1:1 crop of the image's centre instead of the whole image shrunk to fit."""

    def __post_init__(self) -> None:
        from pisa_cli.errors import OptionsError

        if not 32 <= self.cell <= 4096:
            raise OptionsError(f"--sheet-cell {self.cell} must be from 32 to 4096 pixels")


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def cell_image(image: Image.Image, options: SheetOptions) -> Image.Image:
    """What the contact sheet shows of one grid point's image."""
    width, height = image.size
    if options.crop:
        side_w, side_h = min(width, options.cell), min(height, options.cell)
        left, top = (width - side_w) // 2, (height - side_h) // 2
        return image.crop((left, top, left + side_w, top + side_h))
    factor = min(1.0, options.cell / max(width, height))
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class _Layout:
    """Where the cells and labels of a grid picture go."""

    grid: LambdaGrid
    cell: tuple[int, int]
    left: int
    top: int

    def origin(self, point: GridPoint) -> tuple[int, int]:
        column, row = self.grid.pix.index(point.pix), self.grid.sem.index(point.sem)
        return self.left + column * (self.cell[0] + GAP), self.top + row * (self.cell[1] + GAP)

    @property
    def size(self) -> tuple[int, int]:
        columns, rows = len(self.grid.pix), len(self.grid.sem)
        width = self.left + columns * (self.cell[0] + GAP) - GAP + PAD
        height = self.top + rows * (self.cell[1] + GAP) - GAP + PAD
        return width, height


def _canvas(
    grid: LambdaGrid, cell: tuple[int, int], title: list[str], extra_width: int = 0
) -> tuple[Image.Image, ImageDraw.ImageDraw, _Layout]:
    """A blank picture with the title, both axis titles and every axis value drawn."""
    font, small = _font(), _font(FONT_SIZE - 2)
    line = FONT_SIZE + 6
    row_labels = [f"{v:.2f}" for v in grid.sem]
    label_width = max(int(small.getlength(text)) for text in row_labels)
    left = PAD + line + label_width + GAP * 2
    top = PAD + line * len(title) + line * 2 + GAP
    layout = _Layout(grid, cell, left, top)
    width, height = layout.size
    picture = Image.new("RGB", (width + extra_width, height), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for index, text in enumerate(title):
        draw.text((PAD, PAD + index * line), text, fill=INK if index == 0 else MUTED, font=font)
    axis_y = PAD + line * len(title)
    draw.text((left, axis_y), "lambda_pix (fidelity)", fill=INK, font=font)
    for pix in grid.pix:
        x, _ = layout.origin(GridPoint(pix, grid.sem[0]))
        draw.text(
            (x + cell[0] // 2, axis_y + line + line // 2),
            f"{pix:.2f}",
            fill=INK,
            font=small,
            anchor="mm",
        )
    for sem, text in zip(grid.sem, row_labels, strict=True):
        _, y = layout.origin(GridPoint(grid.pix[0], sem))
        draw.text((left - GAP, y + cell[1] // 2), text, fill=INK, font=small, anchor="rm")
    axis = Image.new("RGB", (height - top, line), BACKGROUND)
    ImageDraw.Draw(axis).text((0, 2), "lambda_sem (detail)", fill=INK, font=font)
    picture.paste(axis.rotate(-90, expand=True), (PAD, top))
    return picture, draw, layout


def contact_sheet(
    cells: dict[GridPoint, Image.Image], grid: LambdaGrid, title: list[str]
) -> Image.Image:
    """Every grid point's cell image in its place, axes labelled with the lambdas."""
    width = max(image.width for image in cells.values())
    height = max(image.height for image in cells.values())
    picture, _, layout = _canvas(grid, (width, height), title)
    for point, image in cells.items():
        x, y = layout.origin(point)
        picture.paste(image, (x + (width - image.width) // 2, y + (height - image.height) // 2))
    return picture


def colour(fraction: float) -> tuple[int, int, int]:
    """The viridis colour of ``fraction`` in [0, 1] (nan: grey)."""
    if math.isnan(fraction):
        return (200, 200, 200)
    position = min(max(fraction, 0.0), 1.0) * (len(VIRIDIS) - 1)
    index = min(int(position), len(VIRIDIS) - 2)
    low, high, t = VIRIDIS[index], VIRIDIS[index + 1], position - index
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high, strict=True))  # type: ignore[return-value]


def heat_map(
    values: dict[GridPoint, float],
    grid: LambdaGrid,
    title: list[str],
    lower_is_better: bool,
    best: GridPoint | None,
    fmt: Callable[[float], str] = lambda v: f"{v:.4g}",
) -> Image.Image:
    """One metric over the lambda plane: a coloured cell per point with its value, the best
    point outlined, and a colour bar saying which end is better."""
    font = _font(FONT_SIZE - 2)
    cell = (max(72, max(int(font.getlength(fmt(v))) for v in values.values()) + 16), 40)
    finite = [v for v in values.values() if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = (high - low) or 1.0
    picture, draw, layout = _canvas(grid, cell, title, extra_width=110)
    for point, value in values.items():
        x, y = layout.origin(point)
        fraction = 1.0 if value == math.inf else (value - low) / span
        fill = colour(1 - fraction if lower_is_better else fraction)
        draw.rectangle((x, y, x + cell[0] - 1, y + cell[1] - 1), fill=fill)
        ink = INK if sum(fill) > 380 else BACKGROUND
        draw.text(
            (x + cell[0] // 2, y + cell[1] // 2), fmt(value), fill=ink, font=font, anchor="mm"
        )
        if point == best:
            draw.rectangle(
                (x - 3, y - 3, x + cell[0] + 2, y + cell[1] + 2), outline=HIGHLIGHT, width=3
            )
    _colour_bar(draw, layout, (low, high), lower_is_better, fmt)
    return picture


def _colour_bar(draw: ImageDraw.ImageDraw, layout: _Layout, span, lower_is_better, fmt) -> None:
    font = _font(FONT_SIZE - 2)
    x = layout.size[0] + 8
    top, bottom = layout.top, layout.size[1] - PAD
    steps = max(1, bottom - top)
    for offset in range(steps):
        fraction = 1 - offset / steps
        draw.line((x, top + offset, x + 18, top + offset), fill=colour(fraction))
    best, worst = (span[0], span[1]) if lower_is_better else (span[1], span[0])
    draw.text((x + 24, top), f"{fmt(best)} best", fill=INK, font=font, anchor="lt")
    draw.text((x + 24, bottom), f"{fmt(worst)}", fill=INK, font=font, anchor="lb")
