"""Reading inputs in every mode and writing outputs atomically, one clear error per failure.

``read_picture`` decodes an input into a Picture (colour for the model, alpha apart, grey
or 16-bit kept, EXIF orientation applied, ICC profile and EXIF kept for the output);
``write_output`` encodes the output's Pixels into a temporary file in the output folder,
fsyncs it and renames it into place.
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import png
from PIL import Image, UnidentifiedImageError

from pisa_cli.errors import ImageError
from pisa_cli.fsutil import atomic_path
from pisa_cli.imaging import codecs16
from pisa_cli.imaging.formats import pillow_format, save_options, spec_of
from pisa_cli.imaging.modes import (
    DEEP_GREY_MODES,
    Picture,
    Pixels,
    UnsupportedMode,
    split_8bit,
    split_deep_array,
    split_deep_grey,
)
from pisa_cli.imaging.objects import ObjectPath, storage_errors
from pisa_cli.options import DEFAULT_MAX_PIXELS, WriteOptions

ORIENTATION = 0x0112
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transposition that turns the stored pixels upright (as Pillow's
``ImageOps.exif_transpose``)."""
EXIF_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")
"""Formats whose EXIF is a block of its own; a TIFF's "EXIF" is its file structure."""
CORRUPT = (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError)
CORRUPT += (struct.error, zlib.error)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn whatever reading ``path`` raises into one ImageError naming the file."""
    try:
        yield
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied (cannot read)") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: too many pixels ({error})") from None
    except UnsupportedMode as error:
        raise ImageError(f"{path}: {error}") from None
    except MemoryError:
        raise ImageError(f"{path}: out of memory while decoding") from None
    except (*CORRUPT, png.Error) as error:
        reason = str(error) or type(error).__name__
        raise ImageError(f"{path}: corrupt or truncated image ({reason})") from None


class _OurLimitOnly:
    """Pillow's decompression-bomb limit switched off while we read: --max-pixels, checked
    on every image's header with our message, is the only limit (Pillow's, 179 million
    pixels, would refuse a larger --max-pixels and show its own text before ours). Counted,
    so overlapping reads (the read-ahead thread) restore Pillow's value once, at the end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.readers = 0
        self.saved: int | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.readers == 0:
                self.saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            self.readers += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            with self.lock:
                self.readers -= 1
                if self.readers == 0:
                    Image.MAX_IMAGE_PIXELS = self.saved


our_limit_only = _OurLimitOnly()


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """The image at ``path``, opened (not decoded) with Pillow's own bomb check off for as
    long as it is used: the caller checks the size against --max-pixels first."""
    with our_limit_only(), Image.open(path) as image:
        yield image


def read_picture(path: Path | ObjectPath, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Decode ``path`` for the model; ImageError naming the file and the reason on failure."""
    if isinstance(path, ObjectPath):
        return _read_object(path, max_pixels)
    with _reading(path):
        _check_not_empty(path)
        with _open(path) as image:
            _check_pixels(path, image.size, max_pixels)
            return _decode(path, image)


def _read_object(path: ObjectPath, max_pixels: int) -> Picture:
    """``read_picture`` of an object: its header fetched and checked first (a block, not
    the object), then the whole object, decoded from memory."""
    with _reading(path):
        with path.header() as handle, _open(handle) as image:
            _check_pixels(path, image.size, max_pixels)
        with storage_errors(path):
            data = path.read_bytes()
        with _open(io.BytesIO(data)) as image:
            return _decode(data, image)


def _check_pixels(path: object, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"{path}: {width}x{height} is {width * height:,} pixels, more than "
            f"--max-pixels {max_pixels:,}"
        )


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")


def _decode(path: Path | bytes, image: Image.Image) -> Picture:
    notes: list[str] = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        notes.append(f"animated ({frames} frames): only the first frame is upscaled")
    exif = image.getexif()
    stored_orientation = exif.get(ORIENTATION, 1)
    carried = _carried_exif(image, exif)
    deep = _read_deep_colour(path, image, notes)
    if deep is not None:
        color, alpha, grey, mode = split_deep_array(deep)
        profile = image.info.get("icc_profile") or None
        picture = Picture(color, alpha, grey, mode, profile, carried, notes)
        return picture.transpose(UPRIGHT.get(stored_orientation))
    image.load()
    if image.mode in DEEP_GREY_MODES:
        profile = image.info.get("icc_profile") or None
        picture = Picture(split_deep_grey(image), None, True, image.mode, profile, carried, notes)
    else:
        color, alpha, grey, profile = split_8bit(image, notes)
        picture = Picture(color, alpha, grey, image.mode, profile, carried, notes)
    # Pillow turns a TIFF upright while loading it and drops its orientation: what is left
    # in the EXIF after loading is what remains to be done.
    return picture.transpose(UPRIGHT.get(image.getexif().get(ORIENTATION, 1)))


def _carried_exif(image: Image.Image, exif: Image.Exif) -> bytes | None:
    """The EXIF for the output, orientation set to normal, or None when there is none."""
    if image.format not in EXIF_FORMATS or not len(exif):
        return None
    copy = Image.Exif()
    copy.load(exif.tobytes())
    if ORIENTATION in copy:
        copy[ORIENTATION] = 1
    return copy.tobytes()


def _read_deep_colour(path: Path | bytes, image: Image.Image, notes: list[str]):
    """(H, W, C) uint16 pixels when ``path`` (a file or its bytes) is 16-bit colour (or
    16-bit grey with alpha), which Pillow would cut to 8 bits; None for everything else."""
    if image.format == "PNG":
        header = codecs16.png_header(path)
        if header is not None and header[0] == 16 and header[1] in (2, 4, 6):
            return codecs16.read_png16(path)
    elif image.format == "TIFF" and codecs16.tiff_is_deep_colour(dict(image.tag_v2)):
        try:
            return codecs16.read_tiff16(path)
        except codecs16.CodecMissing:
            notes.append(
                "16-bit TIFF read with 8 bits: its compression needs the imagecodecs package "
                "(pip install imagecodecs)"
            )
    return None


def read_size(path: Path | ObjectPath) -> tuple[int, int]:
    """(width, height) from the image header, upright, without decoding the pixels."""
    if isinstance(path, ObjectPath):
        with _reading(path), path.header() as handle:
            return _upright_size(handle, path)
    with _reading(path):
        _check_not_empty(path)
    return _upright_size(path, path)


def _upright_size(opened: object, path: Path | ObjectPath) -> tuple[int, int]:
    with _reading(path), _open(opened) as image:
        width, height = image.size
        if image.format != "TIFF" and _header_orientation(path, image) in (5, 6, 7, 8):
            return height, width
        return width, height


def _header_orientation(path: Path | ObjectPath, image: Image.Image) -> int:
    """The EXIF orientation without decoding: Pillow's PNG reader decodes the whole image
    to find an eXIf chunk placed after the pixels, so PNGs are searched chunk by chunk.
    Not an object's: a range request per chunk would cost more than the header is worth
    (the pixel count is the same either way; the read applies the orientation)."""
    if image.format != "PNG" or "exif" in image.info:
        return image.getexif().get(ORIENTATION, 1)
    if isinstance(path, ObjectPath):
        return 1
    data = _png_chunk(path, b"eXIf")
    if data is None:
        return 1
    exif = Image.Exif()
    try:
        exif.load(data)
    except CORRUPT:  # an unreadable EXIF is ignored, as the decoder does
        return 1
    return exif.get(ORIENTATION, 1)


PNG_CHUNK_LIMIT = 1 << 24
"""Largest metadata chunk read while looking for one (EXIF blocks are kilobytes)."""


def _png_chunk(path: Path, kind: bytes) -> bytes | None:
    """The data of the first ``kind`` chunk of a PNG, skipping every other chunk's data
    (pixels included) with a seek; None when there is none before IEND or the end."""
    with open(path, "rb") as handle:
        handle.seek(8)
        while len(head := handle.read(8)) == 8:
            length, found = struct.unpack(">I4s", head)
            if found == kind:
                return handle.read(min(length, PNG_CHUNK_LIMIT))
            if found == b"IEND":
                break
            handle.seek(length + 4, 1)  # the data and its CRC
    return None


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB, upright; ImageError on failure."""
    picture = read_picture(path, max_pixels)
    if picture.deep:
        from pisa_cli.imaging.modes import compose

        return compose(picture, picture.color).to_8bit().convert("RGB")
    return picture.color  # type: ignore[return-value]


def write_output(
    pixels: Pixels,
    path: Path | ObjectPath,
    write: WriteOptions | None = None,
    before_replace: Callable[[Path], None] | Callable[[bytes], None] | None = None,
) -> list[str]:
    """Encode ``pixels`` into ``path`` atomically; return what had to give (notes).

    The format follows the extension, ``write`` says how it is encoded (the default
    WriteOptions when None). ``before_replace`` is called with the complete,
    fsynced temporary file just before it replaces ``path`` (the manifest records it there);
    an object (``ObjectPath``) is encoded in memory, ``before_replace`` gets its bytes, and
    one PUT writes it: nothing partial is ever visible at its key.
    """
    fmt = pillow_format(path)
    if not fmt:
        raise ImageError(f"{path}: unknown output format {path.suffix!r}")
    spec = spec_of(fmt)
    if max(pixels.size) > spec.max_side:
        raise ImageError(
            f"{path}: {pixels.size[0]}x{pixels.size[1]} is too large for {fmt} (at most "
            f"{spec.max_side} pixels a side); use --format png or tiff"
        )
    notes: list[str] = []
    try:
        if isinstance(path, ObjectPath):  # encoded in memory, then one PUT
            buffer = io.BytesIO()
            _encode(pixels, fmt, buffer, write or WriteOptions(), notes)
            if before_replace is not None:
                before_replace(buffer.getvalue())
            path.write_bytes(buffer.getvalue())
            return notes
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temp:
            with open(temp, "wb") as handle:
                _encode(pixels, fmt, handle, write or WriteOptions(), notes)
                handle.flush()
            if before_replace is not None:
                before_replace(temp)
    except PermissionError:
        raise ImageError(f"{path}: permission denied (output folder not writable)") from None
    except OSError as error:
        raise ImageError(f"{path}: cannot write ({error.strerror or error})") from None
    return notes


def _encode(
    pixels: Pixels, fmt: str, handle: BinaryIO, write: WriteOptions, notes: list[str]
) -> None:
    spec = spec_of(fmt)
    if pixels.deep is not None and spec.deep:
        if fmt == "PNG":
            codecs16.write_png16(pixels.deep, handle, pixels.icc_profile, pixels.exif)
        else:
            codecs16.write_tiff16(pixels.deep, handle, pixels.icc_profile)
        return
    if pixels.deep is not None:
        notes.append(f"written with 8 bits per channel ({fmt} holds no more)")
    image = pixels.to_8bit()
    if image.mode in ("LA", "RGBA") and not spec.alpha:
        notes.append(f"transparency flattened onto white ({fmt} has none)")
        image = _flatten(image)
    if image.mode in ("L", "LA") and not spec.grey:
        image = image.convert("RGBA" if image.mode == "LA" else "RGB")
    options = save_options(fmt, write)
    if spec.icc and pixels.icc_profile:
        options["icc_profile"] = pixels.icc_profile
    if spec.exif and pixels.exif:
        options["exif"] = pixels.exif
    try:
        image.save(handle, format=fmt, **options)
    except (OSError, ValueError) as error:
        if "cannot write mode" not in str(error):
            raise
        handle.seek(0)
        handle.truncate()
        image.convert("RGBA" if image.mode in ("LA", "RGBA") else "RGB").save(handle, format=fmt)


def _flatten(image: Image.Image) -> Image.Image:
    """Composite an image with alpha onto white."""
    base = image.mode[:-1]
    background = Image.new(base, image.size, 255 if base == "L" else (255, 255, 255))
    background.paste(image.convert(base), mask=image.getchannel("A"))
    return background


def write_image(image: Image.Image, path: Path, **save_options: object) -> None:
    """Save a PIL ``image`` to ``path`` atomically (temp file, fsync, rename); ImageError on
    failure."""
    fmt = pillow_format(path)
    if not fmt:
        raise ImageError(f"{path}: unknown output format {path.suffix!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temp:
            image.save(temp, format=fmt, **save_options)
    except PermissionError:
        raise ImageError(f"{path}: permission denied (output folder not writable)") from None
    except OSError as error:
        raise ImageError(f"{path}: cannot write ({error.strerror or error})") from None
