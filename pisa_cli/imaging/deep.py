"""Pixels with more than 8 bits per channel, kept as float planes in [0, 1].

Pillow holds 16-bit grey (``I;16``) but not 16-bit colour, so deeper images are kept as one
PIL ``"F"`` (float32) image per channel. PIL resizes those with the same filters as 8-bit
images but without rounding to 8 bits, so the pipeline's bicubic steps stay the reference's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEEP_MAX = 65535
"""The largest 16-bit value: 1.0 in the float planes."""
LUMA = (0.299, 0.587, 0.114)
"""ITU-R 601 weights, the ones Pillow's ``convert("L")`` uses for 8-bit grey."""


def plane(values: np.ndarray) -> Image.Image:
    """A PIL "F" image of a 2-D array already scaled to [0, 1]."""
    return Image.fromarray(np.ascontiguousarray(values, dtype=np.float32))


def clipped(image: Image.Image) -> Image.Image:
    """An "F" image with its values clipped to [0, 1] (bicubic and Lanczos overshoot)."""
    return plane(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0))


def plane_from_uint16(values: np.ndarray) -> Image.Image:
    return plane(values.astype(np.float32) / DEEP_MAX)


def to_uint16(image: Image.Image) -> np.ndarray:
    """The 16-bit values of an "F" plane in [0, 1] (rounded to the nearest level)."""
    values = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    return np.rint(values * DEEP_MAX).astype(np.uint16)


@dataclass(frozen=True)
class DeepImage:
    """Colour with more than 8 bits per channel: three PIL "F" planes (R, G, B) in [0, 1].

    It has the few methods of a PIL image that the resizing steps use (``size``, ``resize``,
    ``transpose``), so they take either.
    """

    planes: tuple[Image.Image, Image.Image, Image.Image]

    def __post_init__(self) -> None:
        if len(self.planes) != 3 or any(p.mode != "F" for p in self.planes):
            raise ValueError("a DeepImage is three 'F' planes")
        if len({p.size for p in self.planes}) != 1:
            raise ValueError("the planes of a DeepImage must have one size")

    mode = "RGB;F"
    """Not a Pillow mode: says what this is in messages and reports."""

    @property
    def size(self) -> tuple[int, int]:
        return self.planes[0].size

    @classmethod
    def grey(cls, values: Image.Image) -> DeepImage:
        """A grey plane as colour (the model sees three equal channels)."""
        return cls((values, values, values))

    @classmethod
    def from_array(cls, array: np.ndarray) -> DeepImage:
        """From a (H, W, 3) float array in [0, 1]."""
        return cls(tuple(plane(array[..., i]) for i in range(3)))  # type: ignore[arg-type]

    @classmethod
    def from_uint16(cls, array: np.ndarray) -> DeepImage:
        """From a (H, W, 3) array of 16-bit values."""
        return cls(tuple(plane_from_uint16(array[..., i]) for i in range(3)))  # type: ignore[arg-type]

    def to_array(self) -> np.ndarray:
        """(H, W, 3) float32 in [0, 1]."""
        return np.stack([np.asarray(p, dtype=np.float32) for p in self.planes], axis=-1)

    def resize(self, size: tuple[int, int], resample: int) -> DeepImage:
        if size == self.size:
            return self
        return DeepImage(tuple(clipped(p.resize(size, resample)) for p in self.planes))  # type: ignore[arg-type]

    def transpose(self, method: int) -> DeepImage:
        return DeepImage(tuple(p.transpose(method) for p in self.planes))  # type: ignore[arg-type]

    def luma(self) -> Image.Image:
        """The grey "F" plane of this colour, with Pillow's weights."""
        r, g, b = (np.asarray(p, dtype=np.float32) for p in self.planes)
        return plane(r * LUMA[0] + g * LUMA[1] + b * LUMA[2])


def stack_uint16(planes: Sequence[Image.Image]) -> np.ndarray:
    """(H, W, C) uint16 of "F" planes in [0, 1]."""
    return np.stack([to_uint16(p) for p in planes], axis=-1)
