"""HYPIR-SD2's image path in tensors (REFERENCE section 10): its pre-processing, its one
Gaussian tiler for all three stages, its x0 rule and its float post-processing.

Everything is float: the input in [0, 1] is upsampled with ``F.interpolate`` (bicubic, no
antialias, no clamp), enlarged so its short side is at least the patch, padded with zeros
to a multiple of 8; the output is cropped, mapped back with (x + 1) / 2 (no clamp), resized
back, colour-fixed against the upsampled input, and quantized once by the caller.

The tiler (``tiled_map``) walks square windows row by row (y outer) at positions
``range(0, n - size + 1, stride)`` plus one flush with the far edge, and averages the
windows' outputs with a Gaussian weight (sigma 0.1 x window, x centre (W - 1) / 2, y centre
H / 2, built in float64 and cast to the tile's dtype): out = sum(w f(tile)) / sum(w).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pisa_cli.engine import color
from pisa_cli.engine.tiles import Tile, TilePlan

DEFAULT_PATCH = 512
"""The official patch_size: the window of the encoder (pixels), UNet and decoder (/8)."""
DEFAULT_STRIDE = 256
DEFAULT_TIMESTEP = 200
"""model_t and coeff_t of the release."""
VAE_FACTOR = 8


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Start of each window along an axis of ``size`` (at least ``window``): every
    ``stride`` while the window fits, plus one flush with the far edge if that is missed."""
    if window <= 0 or stride <= 0 or size < window:
        raise ValueError(f"need 0 < window <= size and stride > 0: {window}, {size}, {stride}")
    origins = list(range(0, size - window + 1, stride))
    if (size - window) % stride:
        origins.append(size - window)
    return origins


def plan_windows(height: int, width: int, window: int, stride: int) -> TilePlan:
    """HYPIR's windows over a ``height`` x ``width`` grid, row-major (y outer)."""
    tiles = tuple(
        Tile(top, left, window, window)
        for top in window_origins(height, window, stride)
        for left in window_origins(width, window, stride)
    )
    return TilePlan(height, width, tiles, y_shift=0.5)


def window_weights(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size, size) Gaussian of a window, float64 cast to ``dtype`` (y centre size / 2)."""
    index = torch.arange(size, dtype=torch.float64)
    sigma = 0.1 * size

    def gauss(middle: float) -> torch.Tensor:
        return torch.exp(-((index - middle) ** 2) / (2 * sigma**2))

    return torch.outer(gauss(size / 2), gauss((size - 1) / 2)).to(device, dtype)


TileFn = Callable[[torch.Tensor], torch.Tensor]


def tiled_map(
    fn: TileFn,
    x: torch.Tensor,
    plan: TilePlan,
    out_channels: int,
    up: int = 1,
    down: int = 1,
    tile_batch: int = 1,
) -> torch.Tensor:
    """sum(w fn(tile)) / sum(w) over the windows of ``plan`` on (N, C, H, W) ``x``, in
    float32. ``fn`` maps a (k N, C, s, s) batch of windows to (k N, out_channels, s up /
    down, ...): the output grid is ``up / down`` times the input's. ``tile_batch`` windows
    go through ``fn`` at once (their order, and so the sum's, stays the plan's)."""
    count, _, height, width = x.shape
    out_h, out_w = height * up // down, width * up // down
    size = plan.tile_size[0] * up // down
    out = torch.zeros(count, out_channels, out_h, out_w, device=x.device)
    norm = torch.zeros(1, 1, out_h, out_w, device=x.device)
    weight = window_weights(size, x.dtype, x.device)
    tiles = list(plan.tiles)
    for start in range(0, len(tiles), max(1, tile_batch)):
        group = tiles[start : start + max(1, tile_batch)]
        outputs = fn(torch.cat([x[:, :, t.rows, t.cols] for t in group]))
        for index, tile in enumerate(group):
            part = outputs[index * count : (index + 1) * count]
            top, left = tile.top * up // down, tile.left * up // down
            rows, cols = slice(top, top + size), slice(left, left + size)
            out[:, :, rows, cols] += (part * weight.to(part.dtype)).float()
            norm[:, :, rows, cols] += weight.float()
    return out / norm


def x0_rule(latents: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """x0 = (z - sqrt(1 - abar) eps) / sqrt(abar), abar at coeff_t (HYPIR's scheduler step)."""
    return (latents - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def enlarged_size(height: int, width: int, patch: int) -> tuple[int, int]:
    """The size HYPIR resizes to when the short side is at most ``patch`` (note: at most):
    short side = patch, long side int(long * patch / short); else unchanged."""
    if min(height, width) > patch:
        return height, width
    if height == width:
        return patch, patch
    if height < width:
        return patch, int(width * patch / height)
    return int(height * patch / width), patch


@dataclass(frozen=True)
class Prepared:
    """An image ready for the encoder, and what the end of the path needs."""

    model_input: torch.Tensor
    """(N, 3, H1 + pad, W1 + pad) in [-1, 1], zero-padded to a multiple of 8."""
    ref: torch.Tensor
    """(N, 3, H0, W0) float: the bicubic upsampled input, colour source and output size."""
    work_size: tuple[int, int]
    """(H1, W1): the size before padding (after any enlarging)."""

    @property
    def enlarged(self) -> bool:
        return self.work_size != tuple(self.ref.shape[-2:])


def prepare_input(image: torch.Tensor, scale: int, patch: int) -> Prepared:
    """HYPIR's pre-processing of (N, 3, H, W) float ``image`` in [0, 1] (nothing clamped)."""
    image = image.float()
    ref = image if scale == 1 else F.interpolate(image, scale_factor=scale, mode="bicubic")
    height, width = ref.shape[-2:]
    work = enlarged_size(height, width, patch)
    lq = ref
    if work != (height, width):
        lq = F.interpolate(ref, size=work, mode="bicubic", antialias=True)
    lq = lq * 2 - 1
    pad_h, pad_w = (-work[0]) % VAE_FACTOR, (-work[1]) % VAE_FACTOR
    if pad_h or pad_w:
        lq = F.pad(lq, (0, pad_w, 0, pad_h), mode="constant", value=0.0)
    return Prepared(lq, ref, work)


def finish_output(decoded: torch.Tensor, prepared: Prepared, method: str) -> torch.Tensor:
    """The float result in [0, 1] of decoded (N, 3, H, W) in [-1, 1], unclamped: cropped,
    (x + 1) / 2, resized back to the reference size (bicubic, antialias) when the input was
    enlarged, colour-fixed against the reference (``method``: wavelet, adain or none). The
    caller quantizes (truncating, as the official ``(x * 255).clamp(0, 255)`` to uint8)."""
    height, width = prepared.work_size
    x = (decoded[..., :height, :width].float() + 1) / 2
    if prepared.enlarged:
        x = F.interpolate(x, size=prepared.ref.shape[-2:], mode="bicubic", antialias=True)
    return color.color_fix(method, x, prepared.ref)
