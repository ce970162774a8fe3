"""Lambda grids: the ``--lambda-grid`` syntax, the grid's points and their file names.

``pix=0,0.5,1 sem=0:1.5:0.25`` names both axes, separated by white space; each axis is a
comma list or an inclusive ``start:stop:step`` range. Values are multiples of 0.01, because
the file names (``pix0.50_sem1.30.png``) and the viewer's sliders work in steps of 0.01.
Pure arithmetic: no torch, no pixels, so the CLI checks a grid before loading any model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from pisa_cli.errors import OptionsError
from pisa_cli.options import UpscaleOptions

AXES = ("pix", "sem")
DEFAULT_SPEC = "pix=0:1:0.25 sem=0:1:0.25"
"""5 x 5 points from the pixel-only corner to the paper's default (1, 1)."""
DEFAULT_MAX_POINTS = 100
DECIMALS = 2
"""Grid values are multiples of 10**-DECIMALS."""

_NAME = re.compile(r"([A-Za-z_][\w-]*)\s*=")
_SYNTAX = 'expected e.g. "pix=0,0.5,1 sem=0:1.5:0.25"'


@dataclass(frozen=True)
class GridPoint:
    """One (lambda_pix, lambda_sem) pair of a grid."""

    pix: float
    sem: float

    @property
    def name(self) -> str:
        """The file stem of this point's image: ``pix0.50_sem1.30``."""
        return f"pix{_fmt(self.pix)}_sem{_fmt(self.sem)}"

    @property
    def key(self) -> str:
        """``0.50,1.30``: how the viewer and sweep.json name the point."""
        return f"{_fmt(self.pix)},{_fmt(self.sem)}"


def _fmt(value: float) -> str:
    text = f"{value:.{DECIMALS}f}"
    return "0.00" if text == "-0.00" else text


@dataclass(frozen=True)
class LambdaGrid:
    """The values of both axes; the grid is their product."""

    pix: tuple[float, ...]
    """lambda_pix values, ascending, no duplicates (the contact sheet's columns)."""
    sem: tuple[float, ...]
    """lambda_sem values, ascending, no duplicates (the contact sheet's rows)."""

    def __post_init__(self) -> None:
        for axis in AXES:
            values = getattr(self, axis)
            if not values:
                raise OptionsError(f"--lambda-grid: the {axis} axis has no values")
            if list(values) != sorted(set(values)):
                raise OptionsError(f"--lambda-grid: the {axis} values must ascend without repeats")

    @property
    def points(self) -> list[GridPoint]:
        """Row by row: every pix value for the first sem value, then the next sem value."""
        return [GridPoint(pix, sem) for sem in self.sem for pix in self.pix]

    @property
    def size(self) -> int:
        return len(self.pix) * len(self.sem)

    @property
    def spec(self) -> str:
        """The grid as a comma-list spec that parses back to it."""
        return " ".join(f"{axis}={','.join(_fmt(v) for v in getattr(self, axis))}" for axis in AXES)


def plan_options(options: UpscaleOptions) -> UpscaleOptions:
    """``options`` with a lambda pair that needs both UNet variants: a sweep always runs the
    pixel and the PiSA pass, so its plan (tile batch, memory) is made for two. The sweep's
    own lambdas come from the grid."""
    return replace(options, lambda_pix=1.0, lambda_sem=0.5)


def parse_grid(spec: str, max_points: int = DEFAULT_MAX_POINTS) -> LambdaGrid:
    """The grid of a ``--lambda-grid`` spec; OptionsError naming what is wrong."""
    if max_points < 1:
        raise OptionsError(f"--max-points {max_points} must be at least 1")
    names = list(_NAME.finditer(spec))
    if not names or spec[: names[0].start()].strip():
        raise OptionsError(f"--lambda-grid {spec!r}: {_SYNTAX}")
    axes: dict[str, tuple[float, ...]] = {}
    for index, match in enumerate(names):
        axis = match.group(1).lower()
        if axis not in AXES:
            raise OptionsError(
                f"--lambda-grid: unknown axis {match.group(1)!r}; the axes are pix and sem"
            )
        if axis in axes:
            raise OptionsError(f"--lambda-grid: the {axis} axis is given twice")
        end = names[index + 1].start() if index + 1 < len(names) else len(spec)
        text = "".join(spec[match.end() : end].split())
        axes[axis] = _axis_values(axis, text)
    missing = [axis for axis in AXES if axis not in axes]
    if missing:
        raise OptionsError(
            f"--lambda-grid {spec!r} does not name the {missing[0]} axis; name both, "
            f'e.g. "pix=1 sem=0:1:0.25"'
        )
    grid = LambdaGrid(pix=axes["pix"], sem=axes["sem"])
    if grid.size > max_points:
        raise OptionsError(
            f"--lambda-grid gives {grid.size} points ({len(grid.pix)} pix x {len(grid.sem)} sem), "
            f"more than --max-points {max_points}; use fewer values or raise --max-points"
        )
    return grid


def _axis_values(axis: str, text: str) -> tuple[float, ...]:
    if not text:
        raise OptionsError(
            f"--lambda-grid: the {axis} axis is empty; give values, e.g. {axis}=0,0.5,1"
        )
    if ":" in text:
        values = _range_values(axis, text)
    else:
        values = [_number(axis, item) for item in text.split(",")]
    return tuple(sorted(set(values)))


def _range_values(axis: str, text: str) -> list[float]:
    parts = text.split(":")
    if len(parts) != 3:
        raise OptionsError(
            f"--lambda-grid: {axis}={text} is not start:stop:step (e.g. {axis}=0:1.5:0.25)"
        )
    start, stop, step = (_number(axis, part) for part in parts)
    if step <= 0:
        raise OptionsError(f"--lambda-grid: {axis}={text}: the step must be above 0")
    if stop < start:
        raise OptionsError(f"--lambda-grid: {axis}={text} is an empty range (stop is below start)")
    # Whole hundredths: exact arithmetic, and the stop is included when the steps land on it.
    first, last, hop = (round(v * 10**DECIMALS) for v in (start, stop, step))
    count = (last - first) // hop + 1
    if count > 10_000:
        raise OptionsError(f"--lambda-grid: {axis}={text} has {count} values; use a larger step")
    return [(first + i * hop) / 10**DECIMALS for i in range(count)]


def _number(axis: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        detail = "an empty value" if not text else f"{text!r} is not a number"
        raise OptionsError(f"--lambda-grid: {axis} axis: {detail}") from None
    if not math.isfinite(value):
        raise OptionsError(f"--lambda-grid: {axis} axis: {text!r} is not a finite number")
    scaled = value * 10**DECIMALS
    if abs(scaled - round(scaled)) > 1e-6:
        raise OptionsError(
            f"--lambda-grid: {axis} axis: {text} has more than {DECIMALS} decimals (file names "
            "and the viewer work in steps of 0.01)"
        )
    return round(scaled) / 10**DECIMALS
