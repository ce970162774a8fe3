"""Object storage (``s3://``, ``gs://``, ``memory://`` and whatever else fsspec knows) as
inputs and outputs: an ``ObjectPath`` stands where a local ``Path`` does, and this module
lists, reads and writes objects for discovery, the reader, the writer and the manifest.

Local paths never come here: a run whose inputs and output are all local takes the code
it always took. fsspec (and s3fs or gcsfs) is the optional ``storage`` extra, imported
only when a URL is given; credentials and endpoints are found the usual way (environment,
AWS profiles, ``AWS_ENDPOINT_URL`` for MinIO or R2): nothing is passed to the filesystem.
An output is one PUT of its finished bytes, so nothing partial is ever visible at its key.
"""

from __future__ import annotations

import contextlib
import datetime
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from pisa_cli.errors import ImageError, OptionsError, PisaError

INSTALL = "pip install 'pisa-cli[storage]'"
URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
"""A URL's scheme (two letters at least: ``C://`` stays a Windows path)."""
HEADER_BLOCK = 1 << 16
"""Bytes fetched at a time while reading an image header (s3fs would fetch 50 MiB)."""
KEY_MAX = 1024
"""Longest object key S3 and GCS take, in bytes."""


class StorageError(PisaError):
    """Object storage cannot be used (the extra is missing, an unknown scheme, or a command
    that works on local files only): said before any model loads."""

    exit_code = 3


def is_url(text: object) -> bool:
    """Whether ``text`` names an object (``s3://bucket/key``) rather than a local path."""
    return isinstance(text, str) and URL.match(text) is not None


@cache
def filesystem(protocol: str) -> Any:
    """The fsspec filesystem of ``protocol``, built once; StorageError without the extra."""
    try:
        import fsspec

        return fsspec.filesystem(protocol)
    except ImportError as error:
        raise StorageError(
            f"{protocol}:// needs object storage support: {INSTALL} ({error})"
        ) from None
    except ValueError as error:  # fsspec: "Protocol not known"
        raise StorageError(f"{protocol}://: not a storage fsspec knows ({error})") from None


@dataclass(frozen=True)
class ObjectPath:
    """An object (or a prefix, the object store's folder) named by its URL, with the parts
    of ``pathlib.Path`` that discovery, naming and the writer use."""

    protocol: str
    key: str
    """The path as the filesystem takes it (``bucket/in/a.png``), no trailing slash."""
    size: int | None = field(default=None, compare=False)
    """From the listing that found it (None: not listed)."""
    mtime_ns: int = field(default=0, compare=False)

    @classmethod
    def parse(cls, url: str) -> ObjectPath:
        """The object of ``url`` (StorageError when its storage cannot be used)."""
        protocol = URL.match(url).group(1).lower()  # type: ignore[union-attr]
        if ".." in url[len(protocol) + 3 :].split("/"):  # an HTTP layer may resolve it
            raise OptionsError(f"{url}: '..' in an object's name; name the prefix without it")
        if protocol in ("file", "local"):  # fsspec's local files would skip our link guards
            raise OptionsError(f"{url}: a local file needs no URL; give its path")
        fs = filesystem(protocol)  # first: StorageError without the extra
        from fsspec.core import strip_protocol

        return cls(protocol, strip_protocol(url).rstrip("/") or fs.root_marker)

    @property
    def fs(self) -> Any:
        return filesystem(self.protocol)

    @property
    def _pure(self) -> PurePosixPath:
        return PurePosixPath(self.key)

    @property
    def name(self) -> str:
        return self._pure.name

    @property
    def stem(self) -> str:
        return self._pure.stem

    @property
    def suffix(self) -> str:
        return self._pure.suffix

    @property
    def parent(self) -> ObjectPath:
        parent = str(self._pure.parent)
        return self if parent in (".", self.key) else ObjectPath(self.protocol, parent)

    def __truediv__(self, other: str | Path) -> ObjectPath:
        relative = other.as_posix() if isinstance(other, Path) else str(other)
        if relative in ("", "."):
            return self
        return ObjectPath(self.protocol, f"{self.key.rstrip('/')}/{relative}")

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def as_posix(self) -> str:
        return str(self)

    def resolve(self) -> ObjectPath:
        return self

    absolute = resolve

    def is_relative_to(self, root: object) -> bool:
        if not isinstance(root, ObjectPath) or root.protocol != self.protocol:
            return False
        return self == root or self.key.startswith(root.key.rstrip("/") + "/")

    def relative_to(self, root: ObjectPath) -> PurePosixPath:
        if not self.is_relative_to(root):
            raise ValueError(f"{self} is not under {root}")
        return PurePosixPath(self.key[len(root.key.rstrip("/")) + 1 :] or ".")

    @contextlib.contextmanager
    def header(self) -> Iterator[Any]:
        """A read handle fetched a block at a time (a header costs a block, not the object),
        its first block fetched here so that storage errors are said as such (ImageError),
        not as a corrupt image; an empty object is refused."""
        with storage_errors(self):
            handle = self.fs.open(self.key, "rb", block_size=HEADER_BLOCK, cache_type="readahead")
            handle.read(1)
            handle.seek(0)
        with handle:
            if handle.size == 0:
                raise ImageError(f"{self}: empty file (0 bytes)")
            yield handle

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def write_bytes(self, data: bytes) -> None:
        """One PUT of the whole object: nothing partial is visible at the key."""
        self.fs.pipe_file(self.key, data)

    def stamp(self) -> tuple[int, int]:
        """(size, modification time in ns, whole seconds) of the object, fetched now."""
        info = self.fs.info(self.key)
        return int(info.get("size") or 0), modified_ns(info)


@contextlib.contextmanager
def storage_errors(path: ObjectPath) -> Iterator[None]:
    """Storage errors (the network, credentials, a missing bucket) as one ImageError naming
    the object; a missing object and a refusal pass (the reader says them as for files)."""
    try:
        yield
    except (FileNotFoundError, PermissionError, ImageError):
        raise
    except Exception as error:  # s3fs's OSErrors, and botocore's own exceptions
        reason = getattr(error, "strerror", None) or error
        raise ImageError(f"{path}: cannot read ({reason})") from None


def location(text: str | Path) -> Path | ObjectPath:
    """``text`` as a local Path, or an ObjectPath when it is a URL (StorageError when its
    storage cannot be used)."""
    return ObjectPath.parse(text) if is_url(text) else Path(text)


def modified_ns(info: dict) -> int:
    """An object's modification time from its listing or its header, in whole seconds (as
    ns): a listing gives milliseconds and a HEAD seconds, and both must agree."""
    for name in ("LastModified", "updated", "mtime", "created", "last_modified"):
        value = info.get(name)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime.datetime):
            value = value.timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value) * 1_000_000_000
    return 0


def source_stamp(source: Path | ObjectPath) -> tuple[int, int]:
    """(size, modification time in ns) of an input, local or an object (from its listing
    when it has one)."""
    if isinstance(source, ObjectPath):
        if source.size is not None:
            return source.size, source.mtime_ns
        return source.stamp()
    stat = source.stat()
    return stat.st_size, stat.st_mtime_ns


def listed(protocol: str, info: dict) -> ObjectPath:
    """The ObjectPath of one entry of a listing, with its size and time."""
    size = int(info.get("size") or 0)
    return ObjectPath(protocol, info["name"].rstrip("/"), size, modified_ns(info))


def probe_prefix(folder: ObjectPath, token: str) -> None:
    """Put and delete an empty object under ``folder``: OSError (or the storage's own
    error) when it cannot be written, before any model loads."""
    probe = folder / f".pisa-tmp-probe-{token}"
    probe.write_bytes(b"")
    with contextlib.suppress(OSError, FileNotFoundError):
        probe.fs.rm_file(probe.key)
