"""On-disk cache of what every run would otherwise recompute: the merged UNet and the
prompt embedding.

A run merges PiSA-SR's LoRAs into 866 M UNet weights and encodes its prompt with a 1.4 GB
text encoder; both depend only on files that rarely change. The merged weights are cached
as safetensors in the compute dtype and the embedding as a tiny safetensors file, each
under a key made of the SHA-256 digests of their inputs (and the settings that matter), so
a changed file can never be served a stale result. Digests of large files are remembered
by (path, size, modification time); files in the Hugging Face cache are named by their
digest already.

The cache lives in $PISA_CACHE_DIR or $XDG_CACHE_HOME/pisa-cli (~/.cache/pisa-cli);
PISA_NO_CACHE=1 turns it off. Only the newest MAX_MERGED merged UNets are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from pisa_cli.fsutil import atomic_path, file_sha256

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
MAX_MERGED = 2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def cache_dir() -> Path:
    explicit = os.environ.get("PISA_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pisa-cli"


def enabled() -> bool:
    return os.environ.get("PISA_NO_CACHE", "") in ("", "0")


def file_digest(path: Path) -> str:
    """SHA-256 of a file, computed once per (path, size, mtime) and remembered."""
    resolved = path.resolve()
    if _SHA256.match(resolved.name):  # a Hugging Face blob is named by its digest
        return resolved.name
    stat = resolved.stat()
    marker = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_dir() / "digests.json"
    index = _digest_index(index_path)
    if marker in index:
        return index[marker]
    index[marker] = file_sha256(resolved)
    with contextlib.suppress(OSError):
        index_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(index_path) as temp:
            temp.write_text(json.dumps(index))
    return index[marker]


def _digest_index(path: Path) -> dict[str, str]:
    """The remembered digests; a damaged index counts as empty (and is rewritten), and
    only what looks like a SHA-256 is believed."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as error:
        log.warning("digest index %s unreadable (%s); rebuilding it", path, type(error).__name__)
        return {}
    if not isinstance(index, dict):
        log.warning("digest index %s is not a JSON object; rebuilding it", path)
        return {}
    return {
        marker: digest
        for marker, digest in index.items()
        if isinstance(digest, str) and _SHA256.match(digest)
    }


def make_key(**parts: object) -> str:
    """A short digest of the named parts (strings, numbers, lists of them)."""
    payload = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


Check = Callable[[dict[str, torch.Tensor]], str]
"""What is wrong with an entry's tensors for this run ('' when nothing)."""


def load_tensors(kind: str, key: str, check: Check | None = None) -> dict[str, torch.Tensor] | None:
    """The cached tensors of ``kind`` (merged, prompts) under ``key``, or None. An entry
    that cannot be read, or that ``check`` finds wrong, is deleted with one warning (and
    so rebuilt by the caller)."""
    if not enabled():
        return None
    path = cache_dir() / kind / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = map_safetensors(path)
        problem = check(tensors) if check is not None else ""
    except (ValueError, OSError, RuntimeError, RecursionError, MemoryError) as error:
        problem = f"unreadable ({str(error).strip() or type(error).__name__})"
    if problem:  # a damaged entry is rebuilt, not trusted
        log.warning("cache entry %s %s; rebuilding it", path, problem)
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # most recently used
    return tensors


Spec = Mapping[str, tuple[tuple[int | None, ...], torch.dtype]]
"""Tensor name -> (shape, None for any length; dtype)."""


def mismatch(tensors: Mapping[str, torch.Tensor], expected: Spec) -> str:
    """What differs between ``tensors`` and ``expected`` ('' when they fit)."""
    if tensors.keys() != expected.keys():
        odd = sorted(tensors.keys() ^ expected.keys())[0]
        where = "missing" if odd in expected else "unexpected"
        return f"does not fit: tensor {odd[:80]!r} {where}"
    for name, (shape, dtype) in expected.items():
        tensor = tensors[name]
        fits = len(tensor.shape) == len(shape) and all(
            want is None or have == want for have, want in zip(tensor.shape, shape, strict=True)
        )
        if not fits or tensor.dtype != dtype:
            return (
                f"does not fit: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"expected {dtype} {shape}"
            )
    return ""


def save_tensors(kind: str, key: str, tensors: dict[str, torch.Tensor], keep: int = 0) -> None:
    """Store tensors atomically; with ``keep``, drop all but the ``keep`` newest entries."""
    if not enabled():
        return
    from safetensors.torch import save_file

    folder = cache_dir() / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{key}.safetensors") as temp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp))
    except OSError as error:  # a full or read-only disk must not fail the run
        log.warning("could not write the cache in %s (%s); continuing without", folder, error)
        return
    if keep:
        entries = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-keep]:
            old.unlink(missing_ok=True)


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, mapped from the file rather than copied.

    safetensors' own loader copies every tensor out of its memory map, so loading the
    1.7 GB merged UNet held it twice (mapped pages and copies) and put the peak resident
    memory of a cached run 1.7 GB higher. Here the tensors are views of one private
    (copy-on-write) mapping of the file: its pages are read once, on first use, and the
    page cache can drop them again. A tensor whose offset does not suit its dtype's
    alignment is copied. ValueError for a malformed file, whatever is wrong in it.
    """
    size, spans = safetensors_spans(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)
    tensors = {}
    for name, (dtype, start, end, shape) in spans.items():
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if start % itemsize:  # misaligned for a view: copy this one
            tensor = raw[start:end].clone().view(dtype)
        else:
            count = (end - start) // itemsize
            tensor = torch.empty(0, dtype=dtype).set_(storage, start // itemsize, (count,))
        tensors[name] = tensor.view(shape)
    return tensors


Span = tuple[torch.dtype, int, int, list[int]]
"""(dtype, start, end, shape) of one tensor in a safetensors file (byte offsets in the file)."""


def safetensors_spans(path: Path) -> tuple[int, dict[str, Span]]:
    """The file's size and where each of its tensors lies, from the header alone; ValueError
    for a malformed file, whatever is wrong in it."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 2 <= length <= size - 8:
            raise ValueError(f"{path}: not a safetensors file")
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except RecursionError:
            raise ValueError(f"{path}: header nested too deep") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    data = 8 + length
    spans = {
        name: _span(path, name, info, data, size)
        for name, info in header.items()
        if name != "__metadata__"
    }
    return size, spans


def _span(path: Path, name: str, info: object, data: int, size: int) -> Span:
    """(dtype, start, end, shape) of one header entry, checked against the file's size;
    ValueError when any of it is missing or does not add up."""
    malformed = ValueError(f"{path}: tensor {name[:80]!r} is malformed")
    if not isinstance(info, dict):
        raise malformed
    dtype = (
        _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    )
    offsets, shape = info.get("data_offsets"), info.get("shape")
    if dtype is None or not _whole_numbers(offsets) or not _whole_numbers(shape):
        raise malformed
    if len(offsets) != 2:  # type: ignore[arg-type]
        raise malformed
    start, end = (data + offset for offset in offsets)  # type: ignore[union-attr]
    if not data <= start <= end <= size:
        raise malformed
    count = 1
    for n in shape:  # type: ignore[union-attr]
        count *= n
    if count * torch.empty(0, dtype=dtype).element_size() != end - start:
        raise ValueError(f"{path}: tensor {name[:80]!r} has {end - start} bytes for {shape}")
    return dtype, start, end, shape  # type: ignore[return-value]


def _whole_numbers(value: object) -> bool:
    """A list of whole numbers, 0 or more (not bools)."""
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value
    )
