"""Colour correction of the output against the bicubic upsampled input (REFERENCE section 4).

Images are (1, 3, H, W) float tensors in [0, 1]. ``quantize`` reproduces the reference's
conversion to 8 bits, which truncates (floor) rather than rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5


def quantize(image: torch.Tensor, levels: int = 255) -> torch.Tensor:
    """Snap [0, 1] values down to the grid of ``levels`` steps, as an 8-bit conversion does."""
    return image.clamp(0, 1).mul_(levels).floor_().div_(levels)


def _mean_std(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = image.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2, unbiased=True) + ADAIN_EPS).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Give ``target`` the per-channel mean and standard deviation of ``source``."""
    target, source = target.float(), source.float()
    target_mean, target_std = _mean_std(target)
    source_mean, source_std = _mean_std(source)
    out = (target - target_mean).mul_(source_std / target_std)  # one image-sized buffer
    return out.add_(source_mean).clamp_(0, 1)


def _wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor(
        [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=image.dtype, device=image.device
    )
    kernel = (kernel / 16).expand(image.shape[1], 1, 3, 3)
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=image.shape[1], dilation=radius)


def _wavelet_split(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): the sum of the detail of 5 dilated blurs, and the last blur."""
    high = torch.zeros_like(image)
    for level in range(WAVELET_LEVELS):
        low = _wavelet_blur(image, 2**level)
        high += image - low
        image = low
    return high, image


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The detail of ``target`` on the low frequencies (colour, shading) of ``source``."""
    high, _ = _wavelet_split(target.float())
    _, low = _wavelet_split(source.float())
    return (high + low).clamp(0, 1)


def color_fix(method: str, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Apply ``method`` (adain, wavelet or none).

    ``target`` is computed on in NCHW order whatever its memory layout: a reduction's
    rounding follows the layout (the mean of a channels-last image, what a bf16 VAE on a CPU
    decodes, differs in the last bit from a contiguous one's), and the same image must get
    the same fix whichever path decoded it (alone, cropped from a batch, in bands).
    """
    target = target.contiguous()
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    if method == "none":
        return target.float().clamp(0, 1)
    raise ValueError(f"unknown colour fix {method!r}")
