"""The --lambda-grid syntax: what parses to which grid, and one clear error for the rest."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pisa_cli.errors import OptionsError
from pisa_cli.sweep.grid import DEFAULT_SPEC, GridPoint, LambdaGrid, parse_grid


@pytest.mark.parametrize(
    ("spec", "pix", "sem"),
    [
        ("pix=0,0.5,1 sem=0:1.5:0.25", (0, 0.5, 1), (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5)),
        ("sem=1 pix=1", (1,), (1,)),  # either order
        ("  pix = 1, 0, 0.5   sem=0:0.3:0.1 ", (0, 0.5, 1), (0, 0.1, 0.2, 0.3)),
        ("pix=0:1:0.3 sem=0", (0, 0.3, 0.6, 0.9), (0,)),  # stop not on a step: left out
        ("pix=-0.5,0.5 sem=2", (-0.5, 0.5), (2,)),
        ("pix=1,1,1.00 sem=0.5", (1,), (0.5,)),  # repeats collapse
        ("PIX=1 Sem=0", (1,), (0,)),
        (DEFAULT_SPEC, (0, 0.25, 0.5, 0.75, 1), (0, 0.25, 0.5, 0.75, 1)),
    ],
)
def test_specs_parse(spec, pix, sem):
    grid = parse_grid(spec)
    assert grid.pix == pix and grid.sem == sem
    assert grid.size == len(pix) * len(sem)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected e.g."),
        ("0,1 sem=1", "expected e.g."),
        ("pix=0,1", "does not name the sem axis"),
        ("pix=0,1 sem=", "the sem axis is empty"),
        ("pix=0,,1 sem=1", "an empty value"),
        ("pix=a sem=1", "'a' is not a number"),
        ("pix=nan sem=1", "not a finite number"),
        ("pix=0 sem=1 pix=1", "given twice"),
        ("pix=0 det=1", "unknown axis 'det'"),
        ("pix=0:1 sem=1", "is not start:stop:step"),
        ("pix=0:1:0 sem=1", "the step must be above 0"),
        ("pix=1:0:0.5 sem=1", "empty range"),
        ("pix=0.125 sem=1", "more than 2 decimals"),
        (
            "pix=0:1:0.01 sem=0:1:0.01",
            "10201 points (101 pix x 101 sem), more than --max-points 100",
        ),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(OptionsError, match=None) as caught:
        parse_grid(spec)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_max_points_is_configurable():
    assert parse_grid("pix=0:1:0.1 sem=0:1:0.1", max_points=121).size == 121
    with pytest.raises(OptionsError, match="more than --max-points 120"):
        parse_grid("pix=0:1:0.1 sem=0:1:0.1", max_points=120)


def test_point_names_use_two_decimals():
    assert GridPoint(0.5, 1.3).name == "pix0.50_sem1.30"
    assert GridPoint(-0.0, 2).name == "pix0.00_sem2.00"
    assert GridPoint(-0.25, 0).key == "-0.25,0.00"


def test_points_go_row_by_row():
    grid = parse_grid("pix=0,1 sem=0,0.5")
    assert grid.points == [GridPoint(0, 0), GridPoint(1, 0), GridPoint(0, 0.5), GridPoint(1, 0.5)]


hundredths = st.integers(-300, 300).map(lambda n: n / 100)


@given(st.lists(hundredths, min_size=1, max_size=6), st.lists(hundredths, min_size=1, max_size=6))
def test_the_normalised_spec_parses_back(pix, sem):
    grid = LambdaGrid(tuple(sorted(set(pix))), tuple(sorted(set(sem))))
    assert parse_grid(grid.spec) == grid
    assert len({point.name for point in grid.points}) == grid.size  # names never collide


@given(st.integers(-200, 200), st.integers(0, 300), st.integers(1, 100))
def test_ranges_are_inclusive_and_exact(start, length, step):
    spec = f"pix={start / 100}:{(start + length) / 100}:{step / 100} sem=1"
    grid = parse_grid(spec, max_points=10_000)
    expected = [(start + i) / 100 for i in range(0, length + 1, step)]
    assert list(grid.pix) == expected
