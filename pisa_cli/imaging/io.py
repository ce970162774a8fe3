"""Reading input images and writing outputs atomically, with one clear error per failure."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pisa_cli.errors import ImageError
from pisa_cli.fsutil import atomic_path


def read_image(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB; raise ImageError naming the file and the reason."""
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied (cannot read)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{path}: too many pixels ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:
        reason = str(error) or type(error).__name__
        raise ImageError(f"{path}: corrupt or truncated image ({reason})") from None


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied (cannot read)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"{path}: corrupt image header ({error})") from None


def write_image(image: Image.Image, path: Path, **save_options: object) -> None:
    """Save ``image`` to ``path`` atomically (temp file, fsync, rename); ImageError on failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temp:
            image.save(temp, format=_format_of(path), **save_options)
    except PermissionError:
        raise ImageError(f"{path}: permission denied (output folder not writable)") from None
    except OSError as error:
        raise ImageError(f"{path}: cannot write ({error.strerror or error})") from None


def _format_of(path: Path) -> str:
    extension = path.suffix.lower()
    formats = Image.registered_extensions()
    if extension not in formats:
        raise ImageError(f"{path}: unknown output format {extension!r}")
    return formats[extension]
