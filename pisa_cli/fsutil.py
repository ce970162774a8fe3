"""Atomic file writes shared by every writer of the project (images, checkpoints, reports),
and opening files without following links or blocking on pipes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
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


def regular_only(path: str | Path, flags: int) -> int:
    """An ``opener`` for ``open()`` that opens regular files only: a FIFO or a device raises
    OSError instead of blocking the open or every read (the open itself never blocks)."""
    descriptor = os.open(path, flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    return _regular(descriptor, path)


def no_link(path: str | Path, flags: int) -> int:
    """``regular_only`` that also refuses a symbolic link (ELOOP) rather than follow it: for
    the files we append to in the output folder, where a planted link would lead our writes
    to any file of the user's."""
    return regular_only(path, flags | getattr(os, "O_NOFOLLOW", 0))


def _regular(descriptor: int, path: str | Path) -> int:
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise OSError(errno.EINVAL, kind, str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def kind_of(path: Path, follow: bool = False) -> str | None:
    """What is at ``path``, in words: "a file" (regular), "a folder", "a link" (when not
    following links), "a link to nothing", "a FIFO", "a device", "a socket"; None when
    nothing is there."""
    try:
        mode = os.stat(path).st_mode if follow else os.lstat(path).st_mode
    except FileNotFoundError:
        return "a link to nothing" if os.path.islink(path) else None
    except OSError:  # a file where a folder of the path should be, a folder we cannot search
        return None
    kinds = (
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a device")


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes, read in blocks (the one digest of files in the project).
    Raises OSError for anything but a regular file (a FIFO would block forever)."""
    digest = hashlib.sha256()
    with open(path, "rb", opener=regular_only) as handle:
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
        mode = os.lstat(final).st_mode  # a link is replaced, not followed: not its target's
    except OSError:
        mode = 0
    return mode & 0o7777 if stat.S_ISREG(mode) else 0o666 & ~_UMASK


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
