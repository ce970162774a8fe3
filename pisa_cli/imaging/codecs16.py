"""16-bit colour PNG and TIFF, which Pillow would read and write as 8 bits.

Reading: pypng (PNG, any filter or interlacing) and tifffile (TIFF). Writing PNG: our own
writer (numpy filters, zlib in C, so the write-behind thread does not hold the interpreter),
with the ICC profile (iCCP) and EXIF (eXIf) chunks. Writing TIFF: tifffile, deflate, ICC.
Arrays are (H, W, C) uint16 with C = 1 (grey), 2 (grey, alpha), 3 (RGB) or 4 (RGBA).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}
"""Channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)."""
ROWS_PER_CHUNK = 256
"""Rows filtered and compressed at once: bounds the writer's extra memory."""


class CodecMissing(Exception):
    """The file needs a codec that is not installed (e.g. LZW TIFF without imagecodecs)."""


def png_header(path: Path | bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) of a PNG file (or its bytes), or None when it is not a PNG."""
    if isinstance(path, bytes):
        head = path[:33]
    else:
        with open(path, "rb") as handle:
            head = handle.read(33)
    if len(head) < 33 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def read_png16(path: Path | bytes) -> np.ndarray:
    """The pixels of a 16-bit PNG (a file or its bytes) as (H, W, C) uint16 (a tRNS colour
    key becomes alpha)."""
    import png

    reader = png.Reader(bytes=path) if isinstance(path, bytes) else png.Reader(filename=str(path))
    width, height, rows, info = reader.asDirect()
    planes = info["planes"]
    array = np.empty((height, width * planes), dtype=np.uint16)
    for index, row in enumerate(rows):
        array[index] = row
    return array.reshape(height, width, planes)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _up_filtered(rows: np.ndarray, previous: np.ndarray | None) -> bytes:
    """PNG filter 2 ("Up") on big-endian 16-bit rows: each byte minus the byte above."""
    raw = rows.astype(">u2").view(np.uint8).reshape(rows.shape[0], -1)
    above = np.empty_like(raw)
    above[0] = 0 if previous is None else previous
    above[1:] = raw[:-1]
    filtered = raw - above  # uint8 arithmetic wraps modulo 256, as PNG wants
    tagged = np.empty((raw.shape[0], raw.shape[1] + 1), dtype=np.uint8)
    tagged[:, 0] = 2
    tagged[:, 1:] = filtered
    return tagged.tobytes()


def write_png16(
    array: np.ndarray, handle: BinaryIO, icc_profile: bytes | None, exif: bytes | None
) -> None:
    """A 16-bit PNG of (H, W, C) uint16 pixels, streamed ROWS_PER_CHUNK rows at a time."""
    height, width, channels = array.shape
    handle.write(PNG_SIGNATURE)
    header = struct.pack(">IIBBBBB", width, height, 16, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    handle.write(_chunk(b"IHDR", header))
    if icc_profile:
        handle.write(_chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc_profile)))
    if exif:
        handle.write(_chunk(b"eXIf", exif.removeprefix(b"Exif\0\0")))
    compressor = zlib.compressobj(6)
    previous = None
    for start in range(0, height, ROWS_PER_CHUNK):
        rows = array[start : start + ROWS_PER_CHUNK]
        data = compressor.compress(_up_filtered(rows, previous))
        previous = rows[-1:].astype(">u2").view(np.uint8).reshape(-1)
        if data:
            handle.write(_chunk(b"IDAT", data))
    handle.write(_chunk(b"IDAT", compressor.flush()))
    handle.write(_chunk(b"IEND", b""))


def tiff_is_deep_colour(tags: dict) -> bool:
    """True for a TIFF of 16-bit colour (Pillow's ``tag_v2``), which Pillow reads as 8 bits."""
    bits = tags.get(258, (1,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return tags.get(262) == 2 and len(bits) >= 3 and all(b == 16 for b in bits)


def read_tiff16(path: Path | bytes) -> np.ndarray:
    """The first page of a 16-bit colour TIFF (a file or its bytes) as (H, W, C) uint16, in
    stored orientation."""
    import io

    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(path) if isinstance(path, bytes) else path) as tiff:
            page = tiff.pages[0]
            array = page.asarray()
            planar = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    except (ValueError, ImportError) as error:
        if "imagecodecs" in str(error) or isinstance(error, ImportError):
            raise CodecMissing(str(error)) from None
        raise
    if planar:  # one plane per channel: (C, H, W)
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.dtype != np.uint16 or array.shape[-1] not in (3, 4):
        raise ValueError(f"unexpected 16-bit TIFF layout {array.shape} {array.dtype}")
    return array


def write_tiff16(array: np.ndarray, handle: BinaryIO, icc_profile: bytes | None) -> None:
    """A deflate-compressed 16-bit TIFF; alpha is stored as unassociated (straight) alpha."""
    import tifffile

    channels = array.shape[-1]
    photometric = "rgb" if channels >= 3 else "minisblack"
    extra = ("unassalpha",) if channels in (2, 4) else None
    tifffile.imwrite(
        handle,
        array if channels > 1 else array[..., 0],
        photometric=photometric,
        extrasamples=extra,
        compression="zlib",
        iccprofile=icc_profile,
        metadata=None,
    )
