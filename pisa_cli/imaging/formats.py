"""Output formats: what each can hold (alpha, grey, 16 bits, ICC, EXIF) and its save options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pisa_cli.options import OUTPUT_EXTENSIONS, SAME_FORMAT, WriteOptions

EXTENSIONS = OUTPUT_EXTENSIONS
"""--format value -> output extension (``same`` keeps the input's)."""


@dataclass(frozen=True)
class FormatSpec:
    """What a Pillow output format holds; a writer converts what it does not."""

    alpha: bool = False
    """Holds transparency (else the image is flattened onto white)."""
    grey: bool = True
    """Holds single-channel grey (else it is stored as RGB, which loses nothing)."""
    deep: bool = False
    """Holds 16 bits per channel (else values are rounded to 8 bits)."""
    icc: bool = False
    exif: bool = False
    max_side: int = 2**31 - 1
    """Largest width or height the format can store."""
    lossy: bool = False
    """Takes --quality."""
    options: dict[str, object] = field(default_factory=dict)
    """Fixed Pillow save options."""

    def save_options(self, quality: int) -> dict[str, object]:
        options = dict(self.options)
        if self.lossy:
            options["quality"] = quality
        return options


FORMATS = {
    "PNG": FormatSpec(alpha=True, deep=True, icc=True, exif=True),
    "JPEG": FormatSpec(icc=True, exif=True, max_side=65535, lossy=True),
    "WEBP": FormatSpec(alpha=True, grey=False, icc=True, exif=True, max_side=16383, lossy=True),
    "TIFF": FormatSpec(
        alpha=True, deep=True, icc=True, exif=True, options={"compression": "tiff_adobe_deflate"}
    ),
    "BMP": FormatSpec(alpha=True),
    "GIF": FormatSpec(alpha=True),
}
OTHER = FormatSpec()
"""Formats reached through --format same that are not in FORMATS: Pillow's defaults."""


def pillow_format(path: Path) -> str:
    """Pillow's name of the format that ``path``'s extension stands for ('' when unknown)."""
    Image.init()
    return Image.registered_extensions().get(path.suffix.lower(), "")


def writable(extension: str) -> bool:
    """True when Pillow can write the format of ``extension`` (with the dot)."""
    Image.init()
    fmt = Image.registered_extensions().get(extension.lower(), "")
    return bool(fmt) and fmt in Image.SAVE


def output_extension(format_name: str, source: Path) -> str:
    """The extension an output of ``source`` gets: --format's, or the input's for ``same``
    (``.png`` when Pillow cannot write the input's format)."""
    if format_name != SAME_FORMAT:
        return EXTENSIONS[format_name]
    extension = source.suffix.lower()
    return extension if writable(extension) else ".png"


def spec_of(pillow_name: str) -> FormatSpec:
    return FORMATS.get(pillow_name, OTHER)


def save_options(pillow_name: str, write: WriteOptions, *, subsampling_quality: int = 90) -> dict:
    """Pillow options for a format at ``write.quality``: JPEG keeps full colour resolution
    (4:4:4) from ``subsampling_quality`` up, WebP at 100 is lossless."""
    quality = write.quality
    options = spec_of(pillow_name).save_options(quality)
    if pillow_name == "JPEG" and quality >= subsampling_quality:
        options["subsampling"] = 0
    if pillow_name == "WEBP" and quality == 100:
        options["lossless"] = True
    return options
