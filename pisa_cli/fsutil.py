"""Atomic file writes shared by every writer of the project (images, checkpoints, reports)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".pisa-tmp-"
"""Temporary files start with this and the writer's process id, so a later run can
recognise and remove the leftovers of a killed one (``remove_stale_temp_files``)."""


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success fsync it and rename it into place.

    The temporary file lives in the same folder so the rename is atomic; a crash at any
    moment leaves either the old file, the complete new file, or a hidden temporary file,
    never a partial ``final``. On an exception the temporary file is removed.
    """
    final = Path(final)
    descriptor, name = tempfile.mkstemp(
        prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=final.suffix, dir=final.parent or "."
    )
    os.close(descriptor)
    temp = Path(name)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        # (or the replaced file's), so outputs are as readable as any other file.
        os.chmod(temp, _mode_for(final))
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def probe_writable(folder: Path) -> None:
    """Create and remove a temporary file in ``folder``; OSError when it cannot be written."""
    descriptor, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-probe-", dir=folder)
    os.close(descriptor)
    os.unlink(name)


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes, read in blocks (the one digest of files in the project)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _mode_for(final: Path) -> int:
    try:
        return final.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def _fsync_dir(folder: Path) -> None:
    # The rename is only durable once the directory entry is; not every OS allows this.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def remove_stale_temp_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Remove the temporary files that killed processes left in ``folder``; return them.

    A temporary file whose writer is still running (another run into the same folder) is
    left alone.
    """
    pattern = f"**/{TEMP_PREFIX}*" if recursive else f"{TEMP_PREFIX}*"
    removed = []
    for path in Path(folder).glob(pattern):
        pid = path.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if path.is_file() and not (pid.isdigit() and _alive(int(pid))):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True
