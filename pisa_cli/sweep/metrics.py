"""Image quality metrics of a sweep's grid points.

PSNR and SSIM against the ground truth on the Y channel of YCbCr (ITU-R BT.601, the
"studio range" of MATLAB's rgb2ycbcr, as super-resolution papers and PiSA-SR's do), with
scikit-image: PSNR over a peak of 255, SSIM as in Wang et al. 2004 (Gaussian window of
sigma 1.5, 11 taps, K1 = 0.01, K2 = 0.03, population covariance, mean over the positions
where the window fits). The perceptual metrics come from pyiqa (the ``metrics`` extra)
when it is installed; it downloads each metric's own weights on first use.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pisa_cli.errors import ModelError, OptionsError

FULL_REFERENCE = ("psnr", "ssim", "lpips", "dists")
"""Metrics that compare with the ground truth (need --gt)."""
NO_REFERENCE = ("clipiqa", "musiq", "niqe")
"""Metrics of the image alone."""
ALL_METRICS = FULL_REFERENCE + NO_REFERENCE
BUILT_IN = ("psnr", "ssim")
"""Computed with scikit-image; the others need pyiqa."""
LOWER_IS_BETTER = frozenset({"lpips", "dists", "niqe"})
EXTRA_HINT = "pipx install 'pisa-cli[metrics]' (or pip install pyiqa)"


def parse_metrics(text: str, has_gt: bool) -> tuple[str, ...]:
    """The metric names of ``--metrics`` (comma list or ``all``), checked against --gt and
    the installed libraries; OptionsError naming the problem."""
    names: list[str] = []
    for item in text.replace(" ", "").lower().split(","):
        if not item:
            continue
        expanded = ALL_METRICS if item == "all" else (item,)
        for name in expanded:
            if name not in ALL_METRICS:
                raise OptionsError(
                    f"--metrics: unknown metric {item!r}; choose from {', '.join(ALL_METRICS)} "
                    "or all"
                )
            if name not in names:
                names.append(name)
    needs_gt = [name for name in names if name in FULL_REFERENCE]
    if needs_gt and not has_gt:
        raise OptionsError(
            f"--metrics {needs_gt[0]} compares with the ground truth: give --gt DIR "
            "(or ask only for clipiqa, musiq, niqe)"
        )
    extra = [name for name in names if name not in BUILT_IN]
    if extra and importlib.util.find_spec("pyiqa") is None:
        raise OptionsError(
            f"--metrics {extra[0]} needs the optional pyiqa package, which is not installed: "
            f"{EXTRA_HINT}"
        )
    return tuple(names)


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """Y of YCbCr (BT.601, range 16-235) of an (H, W, 3) uint8 RGB array, as float64."""
    scaled = rgb.astype(np.float64) / 255
    return 16 + scaled @ np.array([65.481, 128.553, 24.966])


def _crop(array: np.ndarray, border: int) -> np.ndarray:
    if border <= 0:
        return array
    return array[border:-border, border:-border]


def psnr_y(image: np.ndarray, truth: np.ndarray, border: int = 0) -> float:
    """PSNR in dB of the Y channels (peak 255); inf for identical images."""
    from skimage.metrics import peak_signal_noise_ratio

    ours, theirs = _crop(y_channel(image), border), _crop(y_channel(truth), border)
    if np.array_equal(ours, theirs):
        return math.inf
    return float(peak_signal_noise_ratio(theirs, ours, data_range=255))


def ssim_y(image: np.ndarray, truth: np.ndarray, border: int = 0) -> float:
    """Mean SSIM of the Y channels (Wang et al.'s Gaussian-window SSIM); nan below 11 px."""
    from skimage.metrics import structural_similarity

    ours, theirs = _crop(y_channel(image), border), _crop(y_channel(truth), border)
    if min(ours.shape) < 11:
        return math.nan
    return float(
        structural_similarity(
            theirs,
            ours,
            data_range=255,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


class MetricSet:
    """The chosen metrics, their models loaded once per run."""

    def __init__(self, names: Sequence[str], device: str = "cpu", border: int = 0):
        self.names = tuple(names)
        self.device = device
        self.border = border
        self._models: dict[str, object] = {}

    def load(self) -> None:
        """Load every pyiqa model now, so that a failure stops the run before any image."""
        for name in self.names:
            if name not in BUILT_IN:
                self._model(name)

    @property
    def needs_gt(self) -> bool:
        return any(name in FULL_REFERENCE for name in self.names)

    def measure(self, image: Image.Image, truth: Image.Image | None) -> dict[str, float]:
        """Every metric of ``image`` (and ``truth``, the same size, for full-reference ones)."""
        ours = np.asarray(image.convert("RGB"))
        theirs = None if truth is None else np.asarray(truth.convert("RGB"))
        values: dict[str, float] = {}
        for name in self.names:
            if name == "psnr":
                values[name] = psnr_y(ours, theirs, self.border)  # type: ignore[arg-type]
            elif name == "ssim":
                values[name] = ssim_y(ours, theirs, self.border)  # type: ignore[arg-type]
            else:
                values[name] = self._pyiqa(name, ours, theirs)
        return values

    def _pyiqa(self, name: str, image: np.ndarray, truth: np.ndarray | None) -> float:
        import torch

        metric = self._model(name)
        with torch.inference_mode():
            inputs = [_tensor(image, self.device)]
            if name in FULL_REFERENCE:
                inputs.append(_tensor(truth, self.device))  # type: ignore[arg-type]
            score = metric(*inputs)  # type: ignore[operator]
        return float(score)

    def _model(self, name: str) -> object:
        if name not in self._models:
            import pyiqa

            try:
                self._models[name] = pyiqa.create_metric(name, device=self.device)
            except Exception as error:
                raise ModelError(
                    f"--metrics {name}: pyiqa could not load the metric ({error}); it downloads "
                    "the metric's weights on first use, which needs the network once"
                ) from None
        return self._models[name]


def _tensor(array: np.ndarray, device: str):
    """(1, 3, H, W) float in [0, 1], as pyiqa takes images."""
    import torch

    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255
    return tensor.to(device)


def best_points(rows: Sequence[dict[str, float]], names: Sequence[str]) -> dict[str, int]:
    """Index of the best row per metric (highest, or lowest where lower is better), ignoring
    nan; metrics with no finite value are left out."""
    best: dict[str, int] = {}
    for name in names:
        scored = [(row[name], i) for i, row in enumerate(rows) if not math.isnan(row[name])]
        if not scored:
            continue
        pick = min if name in LOWER_IS_BETTER else max
        best[name] = pick(scored, key=lambda item: item[0])[1]
    return best
