"""Atomic file writes shared by every writer of the project (images, checkpoints, reports)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".pisa-tmp-"
"""Temporary files start with this, so a later run can recognise and remove leftovers."""


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success fsync it and rename it into place.

    The temporary file lives in the same folder so the rename is atomic; a crash at any
    moment leaves either the old file, the complete new file, or a hidden temporary file,
    never a partial ``final``. On an exception the temporary file is removed.
    """
    final = Path(final)
    descriptor, name = tempfile.mkstemp(
        prefix=TEMP_PREFIX, suffix=final.suffix, dir=final.parent or "."
    )
    os.close(descriptor)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def _fsync_dir(folder: Path) -> None:
    # The rename is only durable once the directory entry is; not every OS allows this.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
