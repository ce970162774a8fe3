"""Sweep metrics: scikit-image's PSNR and SSIM against a hand computation, the pyiqa path
with a stand-in module, and the choice of metrics."""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types

import numpy as np
import pytest
from PIL import Image

from pisa_cli.errors import OptionsError
from pisa_cli.sweep.metrics import MetricSet, best_points, parse_metrics, psnr_y, ssim_y, y_channel
from tests.builders import noise_image


def pair(seed: int = 0, size=(37, 29)) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(noise_image(*size, seed))
    rng = np.random.default_rng(seed)
    noisy = np.clip(truth + rng.normal(0, 9, truth.shape), 0, 255).astype(np.uint8)
    return noisy, truth


def hand_y(rgb: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr's Y, written out per channel."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255


def hand_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004, literally: an 11x11 Gaussian window (sigma 1.5) at every position
    where it fits, weighted means, variances and covariance, the SSIM formula, the mean."""
    taps = np.exp(-0.5 * (np.arange(11) - 5) ** 2 / 1.5**2)
    window = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for top in range(x.shape[0] - 10):
        for left in range(x.shape[1] - 10):
            a, b = x[top : top + 11, left : left + 11], y[top : top + 11, left : left + 11]
            mu_a, mu_b = (window * a).sum(), (window * b).sum()
            var_a = (window * (a - mu_a) ** 2).sum()
            var_b = (window * (b - mu_b) ** 2).sum()
            cov = (window * (a - mu_a) * (b - mu_b)).sum()
            values.append(
                ((2 * mu_a * mu_b + c1) * (2 * cov + c2))
                / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
            )
    return float(np.mean(values))


def test_y_channel_is_bt601_studio_range():
    rgb = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [12, 200, 77]]], dtype=np.uint8)
    assert np.allclose(y_channel(rgb), hand_y(rgb))
    assert y_channel(rgb)[0, 0] == pytest.approx(16) and y_channel(rgb)[0, 1] == pytest.approx(235)


def test_psnr_matches_the_formula():
    image, truth = pair(1)
    mse = np.mean((hand_y(image) - hand_y(truth)) ** 2)
    assert psnr_y(image, truth) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)
    inner = (slice(3, -3), slice(3, -3))
    mse = np.mean((hand_y(image)[inner] - hand_y(truth)[inner]) ** 2)
    assert psnr_y(image, truth, border=3) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)


def test_ssim_matches_a_hand_computation():
    image, truth = pair(2)
    expected = hand_ssim(hand_y(image), hand_y(truth))
    assert ssim_y(image, truth) == pytest.approx(expected, abs=1e-9)
    assert 0.2 < expected < 0.99  # a real comparison, not a degenerate one


def test_identical_images_and_tiny_images():
    image, _ = pair(3)
    assert psnr_y(image, image) == math.inf
    assert ssim_y(image, image) == pytest.approx(1.0)
    assert math.isnan(ssim_y(image[:8, :8], image[:8, :8]))


@pytest.mark.parametrize(
    ("text", "has_gt", "expected"),
    [
        ("", True, ()),
        ("psnr,ssim", True, ("psnr", "ssim")),
        (" SSIM , psnr,ssim", True, ("ssim", "psnr")),
    ],
)
def test_metric_lists(text, has_gt, expected):
    assert parse_metrics(text, has_gt) == expected


@pytest.mark.parametrize(
    ("text", "has_gt", "message"),
    [
        ("psnr,sharpness", True, "unknown metric 'sharpness'"),
        ("psnr", False, "--metrics psnr compares with the ground truth: give --gt DIR"),
        ("lpips", True, "needs the optional pyiqa package, which is not installed: pipx install"),
        ("niqe", False, "pisa-cli[metrics]"),
        ("all", True, "pyiqa"),
    ],
)
def test_metric_list_errors(text, has_gt, message, monkeypatch):
    monkeypatch.delitem(sys.modules, "pyiqa", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(OptionsError) as caught:
        parse_metrics(text, has_gt)
    assert message in str(caught.value)


@pytest.fixture
def fake_pyiqa(monkeypatch):
    """A stand-in pyiqa: 'lpips' is the mean absolute difference, 'niqe' the mean value."""
    import torch

    created = []

    def create_metric(name, device="cpu"):
        created.append((name, device))
        if name == "lpips":
            return lambda x, y: (x - y).abs().mean()
        return lambda x: x.mean() * torch.ones(1)

    module = types.ModuleType("pyiqa")
    module.__spec__ = importlib.machinery.ModuleSpec("pyiqa", None)
    module.create_metric = create_metric
    monkeypatch.setitem(sys.modules, "pyiqa", module)
    return created


def test_perceptual_metrics_go_through_pyiqa(fake_pyiqa):
    names = parse_metrics("psnr,lpips,niqe", has_gt=True)
    metrics = MetricSet(names, "cpu")
    metrics.load()
    assert fake_pyiqa == [("lpips", "cpu"), ("niqe", "cpu")]
    image, truth = pair(4)
    values = metrics.measure(Image.fromarray(image), Image.fromarray(truth))
    assert values["lpips"] == pytest.approx(np.abs(image / 255 - truth / 255).mean(), rel=1e-5)
    assert values["niqe"] == pytest.approx(image.mean() / 255, rel=1e-5)
    assert values["psnr"] == pytest.approx(psnr_y(image, truth))
    assert len(fake_pyiqa) == 2  # loaded once


def test_best_points_know_which_way_is_better():
    rows = [
        {"psnr": 20.0, "lpips": 0.3, "niqe": math.nan},
        {"psnr": 25.0, "lpips": 0.4, "niqe": math.nan},
        {"psnr": math.nan, "lpips": 0.1, "niqe": math.nan},
    ]
    assert best_points(rows, ["psnr", "lpips", "niqe"]) == {"psnr": 1, "lpips": 2}
