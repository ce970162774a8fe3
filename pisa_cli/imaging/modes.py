"""Image modes: what of a decoded image goes through the model, and how the output is
put back together.

The model sees colour only: 8-bit RGB, or float planes (DeepImage) for 16-bit inputs. Grey
inputs go through as three equal channels and come back grey; transparency never goes
through the model: it is upscaled apart with Lanczos and re-attached. The README's mode
table says the same for each Pillow mode.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageCms

from pisa_cli.imaging.deep import (
    DeepImage,
    clipped,
    plane,
    plane_from_uint16,
    stack_uint16,
)

ALPHA_FILTER = Image.Resampling.LANCZOS
"""The classic filter that upscales transparency (the model never sees it)."""
DEEP_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
EIGHT_BIT_MODES = {
    "1": ("L", False),
    "L": ("L", False),
    "LA": ("LA", False),
    "La": ("LA", False),
    "P": ("RGB", False),
    "PA": ("RGBA", False),
    "RGB": ("RGB", False),
    "RGBX": ("RGB", False),
    "RGBA": ("RGBA", False),
    "RGBa": ("RGBA", False),
    "YCbCr": ("RGB", True),
    "HSV": ("RGB", True),
}
"""Pillow mode -> (the mode we work in, whether to say it was converted)."""


class UnsupportedMode(ValueError):
    """A Pillow mode this tool does not upscale (32-bit float, LAB ...)."""


@dataclass(frozen=True)
class Picture:
    """A decoded input, split into what the model sees and what it must not touch."""

    color: Image.Image | DeepImage
    """What goes through the model: 8-bit RGB (PIL), or deeper colour as float planes."""
    alpha: Image.Image | None = None
    """Transparency: "L" with 8-bit colour, "F" in [0, 1] with deep colour; None if opaque."""
    grey: bool = False
    """The input was grey: the output is grey too."""
    mode: str = "RGB"
    """The input's mode as Pillow names it (``RGB;16``, ``RGBA;16``, ``LA;16`` for 16-bit
    colour and grey with alpha, which Pillow has no mode for), for reports."""
    icc_profile: bytes | None = None
    """The input's ICC profile, carried to the output."""
    exif: bytes | None = None
    """The input's EXIF with the orientation reset (it is applied to the pixels)."""
    notes: list[str] = field(default_factory=list)
    """What the reader had to change (animation, CMYK, a missing codec)."""

    @property
    def deep(self) -> bool:
        return isinstance(self.color, DeepImage)

    @property
    def size(self) -> tuple[int, int]:
        return self.color.size

    def transpose(self, method: int | None) -> Picture:
        """The picture turned upright (``method`` from the EXIF orientation; None: as is)."""
        if method is None:
            return self
        alpha = None if self.alpha is None else self.alpha.transpose(method)
        return replace(self, color=self.color.transpose(method), alpha=alpha)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Pixels:
    """An output ready to encode: an 8-bit PIL image, or 16-bit values (H, W, C)."""

    image: Image.Image | None = None
    """8-bit output in mode L, LA, RGB or RGBA."""
    deep: np.ndarray | None = None
    """uint16 output with C = 1 (grey), 2 (grey, alpha), 3 (RGB) or 4 (RGBA)."""
    icc_profile: bytes | None = None
    exif: bytes | None = None

    @property
    def size(self) -> tuple[int, int]:
        if self.image is not None:
            return self.image.size
        assert self.deep is not None
        return self.deep.shape[1], self.deep.shape[0]

    def to_8bit(self) -> Image.Image:
        """The output at 8 bits per channel (16-bit values rounded)."""
        if self.image is not None:
            return self.image
        assert self.deep is not None
        values = np.rint(self.deep.astype(np.float32) / 257).astype(np.uint8)
        return Image.fromarray(values[..., 0] if values.shape[-1] == 1 else values)


def split_8bit(
    image: Image.Image, notes: list[str]
) -> tuple[Image.Image, Image.Image | None, bool, bytes | None]:
    """(8-bit RGB colour, "L" alpha or None, grey, ICC profile for the output) of a loaded
    Pillow image."""
    mode = image.mode
    profile = image.info.get("icc_profile") or None
    if mode == "CMYK":
        rgb, profile = _cmyk_to_rgb(image, profile, notes)
        return rgb, None, False, profile
    if mode not in EIGHT_BIT_MODES:
        raise UnsupportedMode(f"image mode {mode} is not supported (convert it to RGB first)")
    target, say = EIGHT_BIT_MODES[mode]
    if say:
        notes.append(f"{mode} converted to RGB")
    if "transparency" in image.info and target in ("L", "RGB"):
        target += "A"  # palette, grey or RGB with a transparent colour key
    converted = image if image.mode == target else image.convert(target)
    alpha = converted.getchannel("A") if target.endswith("A") else None
    return converted.convert("RGB"), alpha, target in ("L", "LA"), profile


def _cmyk_to_rgb(
    image: Image.Image, profile: bytes | None, notes: list[str]
) -> tuple[Image.Image, bytes | None]:
    """RGB of a CMYK image and the profile of that RGB: through its ICC profile to sRGB when
    it has one (a CMYK profile must not be attached to RGB pixels), else Pillow's formula."""
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            srgb = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
            if converted is not None:
                notes.append("CMYK converted to sRGB with its ICC profile")
                return converted, srgb_profile()
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    notes.append("CMYK converted to RGB without a colour profile")
    return image.convert("RGB"), None


def srgb_profile() -> bytes:
    """The ICC profile of sRGB, attached to CMYK inputs converted to sRGB."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def split_deep_grey(image: Image.Image) -> DeepImage:
    """A 16-bit (or 32-bit integer) grey Pillow image as deep colour of three equal planes."""
    values = np.asarray(image).astype(np.int64)
    return DeepImage.grey(plane_from_uint16(np.clip(values, 0, 65535)))


def split_deep_array(array: np.ndarray) -> tuple[DeepImage, Image.Image | None, bool, str]:
    """(colour, alpha, grey, mode name) of (H, W, C) uint16 pixels from a 16-bit codec."""
    channels = array.shape[-1]
    grey = channels <= 2
    alpha = plane_from_uint16(array[..., -1]) if channels in (2, 4) else None
    if grey:
        color = DeepImage.grey(plane_from_uint16(array[..., 0]))
    else:
        color = DeepImage.from_uint16(array[..., :3])
    mode = {1: "I;16", 2: "LA;16", 3: "RGB;16", 4: "RGBA;16"}[channels]
    return color, alpha, grey, mode


def compose(picture: Picture, upscaled: Image.Image | DeepImage) -> Pixels:
    """The output: the model's colour, made grey again for grey inputs, with the input's
    alpha upscaled by Lanczos to the output size and re-attached."""
    size = upscaled.size
    if isinstance(upscaled, DeepImage):
        planes = [upscaled.luma()] if picture.grey else list(upscaled.planes)
        if picture.alpha is not None:
            alpha = picture.alpha
            if alpha.mode != "F":
                alpha = plane(np.asarray(alpha, dtype=np.float32) / 255)
            planes.append(clipped(alpha.resize(size, ALPHA_FILTER)))
        return Pixels(deep=stack_uint16(planes), icc_profile=picture.icc_profile, exif=picture.exif)
    image = upscaled.convert("L") if picture.grey else upscaled
    if picture.alpha is not None:
        image = image.copy() if image is upscaled else image
        image.putalpha(picture.alpha.resize(size, ALPHA_FILTER))
    return Pixels(image=image, icc_profile=picture.icc_profile, exif=picture.exif)
