"""The output folder's manifest: which settings and which input made each output.

``.pisa-manifest.jsonl`` holds one JSON line per output written: its path (relative to
the output folder), the input's size and modification time, the settings and their key
(a hash), and the output's size, modification time and SHA-256. A record is appended
(and fsynced) after the output's temporary file is complete and before it is renamed
into place, so every output file the tool wrote has a record, whenever the process died.

Several processes (the ranks of a multi-GPU or multi-machine run) write into one output
folder at once. Each appends to a file of its own: rank 0 (and a single process) to
``.pisa-manifest.jsonl``, rank N to ``.pisa-manifest.rankN.jsonl``; a manifest is read as
all of them together. No lock is needed, which matters on shared storage: appends from
several machines to one NFS file are not atomic, and file locks are not available on every
network filesystem. A killed rank or a failed write (a full disk) can only cut the last
line of its own file: every record starts on a new line (a newline first when the file
does not end in one), and a cut line read back is skipped with one warning.

The manifest is data anyone could have written: a record is used only when every field has
its type and range and its output lies inside the folder (a record naming ``../photo.png``
would hide that input from discovery); others are skipped with one warning per file. The
files are opened without following links and only when they are regular files, so a
manifest planted as a link (to a file of the user's) or a FIFO is never written or read
through (``manifest_problem`` names it before a run).

On a rerun an existing output is skipped only when it is the file a record describes and
that record's settings key and input match this run; an output written with other
settings or from a changed input is redone. A file the manifest does not describe was not
written by this tool (or was edited since): it is kept, and said so, unless --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pisa_cli.fsutil import file_sha256, kind_of, no_link
from pisa_cli.imaging.objects import source_stamp

log = logging.getLogger(__name__)

MANIFEST_NAME = ".pisa-manifest.jsonl"
RANK_MANIFEST_GLOB = ".pisa-manifest.rank*.jsonl"


def manifest_name(rank: int = 0) -> str:
    """The file rank ``rank`` appends to (rank 0 and single processes: the main one)."""
    return MANIFEST_NAME if rank == 0 else f".pisa-manifest.rank{rank}.jsonl"


RUN, SKIP = "run", "skip"


def settings_key(settings: dict) -> str:
    """A short hash of the settings (canonical JSON): equal settings, equal key."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rank_of(path: Path) -> int:
    number = path.name.removeprefix(".pisa-manifest.rank").removesuffix(".jsonl")
    return int(number) if number.isdigit() else -1


@dataclass(frozen=True)
class Record:
    """What the manifest knows of one output it wrote."""

    key: str
    """The settings key the output was made with."""
    source_bytes: int
    source_mtime_ns: int
    output_bytes: int
    output_mtime_ns: int
    output_sha256: str
    output_md5: str = ""
    """Object storage's records only: the MD5 of the output's bytes (its ETag after one PUT),
    lower case; "" where none is recorded or it is not 32 characters (then the SHA-256)."""

    @classmethod
    def from_json(cls, line: dict) -> Record:
        """The record of a parsed line; ValueError (KeyError, TypeError) when a field is
        missing, of another type or out of range (``Infinity``, ``1e400``, ``true``...)."""
        return cls(
            key=_text(line["settings_key"]),
            source_bytes=_integer(line["source_bytes"], 0),
            source_mtime_ns=_integer(line["source_mtime_ns"]),
            output_bytes=_integer(line["output_bytes"], 0),
            output_mtime_ns=_integer(line["output_mtime_ns"]),
            output_sha256=_digest(line["output_sha256"]),
            output_md5=_md5(line.get("output_md5")),
        )

    def describes(self, stat: os.stat_result) -> bool:
        """Same size and modification time: this record's file, without reading it."""
        return stat.st_size == self.output_bytes and stat.st_mtime_ns == self.output_mtime_ns


@dataclass(frozen=True)
class Decision:
    """Whether to run a job, and why (said in the report)."""

    action: str
    """run or skip."""
    reason: str


class Manifest:
    """The manifest of one output folder: read once, appended to as outputs are written
    (to ``rank``'s own file)."""

    def __init__(self, root: Path, settings: dict | None = None, rank: int = 0):
        self.root = root
        self.path = root / manifest_name(rank)
        self.settings = settings or {}
        self.key = settings_key(self.settings)
        self._records: dict[str, list[Record]] = {}
        self._lock = threading.Lock()
        self.unreadable_lines = 0
        for path in self.files():
            try:
                self._load(path)
            except OSError as error:  # its outputs then count as not written by pisa: kept
                log.warning("%s: cannot read the manifest (%s)", path, error)

    def files(self) -> list[Path]:
        """The manifest files in the folder: the main one, then each rank's, in rank order
        (regular files only: links, folders and FIFOs are not read, see
        ``manifest_problem``)."""
        return [path for path in manifest_files(self.root) if kind_of(path) == FILE]

    def close(self) -> None:
        """Nothing to do: every record is in its file as it is written (object storage's
        manifest gathers its parts here)."""

    def use_settings(self, settings: dict) -> None:
        """The settings of this run: outputs are checked and recorded against them."""
        self.settings = settings
        self.key = settings_key(settings)

    def _load(self, path: Path) -> None:
        """Read one manifest file; a line that does not parse (cut by a failed write or a
        killed run) is skipped, said once per file; so are records that are not ours (a
        field of another type or out of range, an output outside the folder)."""
        with open(path, encoding="utf-8", errors="replace", opener=no_link) as handle:
            self._take(path, handle)

    def _take(self, path: object, lines: Iterable[str]) -> None:
        """The records of the ``lines`` of the manifest file ``path``, as ``_load`` says."""
        cut, bad, outside = 0, 0, 0
        for text in lines:
            if not text.strip():
                continue
            parsed = _parse(text)
            if parsed is None or parsed[0] > 0:
                cut += 1
            if parsed is BAD:
                bad += 1
            elif parsed is not None and not _inside(parsed[1]):
                outside += 1
            elif parsed is not None:
                name, record = parsed[1], parsed[2]
                self._records.setdefault(name, []).append(record)
        _say_ignored(path, bad, outside)
        if cut:
            log.warning(
                "%s: %d cut line%s skipped (a write that failed or a run stopped while "
                "writing); the records before and after it count",
                path,
                cut,
                "" if cut == 1 else "s",
            )
        self.unreadable_lines += cut

    def _name(self, output: Path) -> str:
        try:
            return output.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return output.resolve().as_posix()

    def outputs(self) -> set[Path]:
        """Resolved paths of every output the manifest records (never taken as inputs), those
        inside the folder only (a link in it may lead elsewhere)."""
        root = self.root.resolve()
        paths = {(root / name).resolve() for name in self._records}
        return {path for path in paths if path.is_relative_to(root)}

    def decide(self, source: Path, output: Path, overwrite: bool = False) -> Decision:
        """Run or skip ``source`` -> ``output`` under this manifest's settings."""
        try:
            stat = os.lstat(output)  # a link there is not ours: never followed
        except FileNotFoundError:
            return Decision(RUN, "new")
        if overwrite:
            return Decision(RUN, "--overwrite")
        kind = kind_of(output)
        if kind != FILE:  # never opened: a FIFO would block the hash forever
            return Decision(SKIP, f"{output} exists and is {kind}: kept (--overwrite replaces it)")
        records = self._records.get(self._name(output), [])
        record = next((r for r in reversed(records) if r.describes(stat)), None)
        # copied or touched: the same bytes still count
        return verdict(self.key, source, output, records, record, lambda: file_sha256(output))

    def _line(self, source, output, size: int, mtime_ns: int, sha256: str, **more) -> dict:
        """The record of an output of ``size`` bytes (its stamp and digest) made from
        ``source`` under this manifest's settings, as a JSON object."""
        source_bytes, source_mtime_ns = source_stamp(source)
        return {
            "output": self._name(output),
            "source": str(source.resolve()),
            "source_bytes": source_bytes,
            "source_mtime_ns": source_mtime_ns,
            "settings_key": self.key,
            "settings": self.settings,
            "output_bytes": size,
            "output_mtime_ns": mtime_ns,
            "output_sha256": sha256,
            **more,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def record(self, source: Path, output: Path, written: Path) -> None:
        """Append the record of ``written`` (the complete temporary file that is about to
        become ``output``) and fsync it. Called from writer threads."""
        stat = written.stat()
        line = self._line(source, output, stat.st_size, stat.st_mtime_ns, file_sha256(written))
        data = (json.dumps(line, sort_keys=True, default=str) + "\n").encode("utf-8")
        with self._lock:
            with open(self.path, "a+b", opener=no_link) as handle:
                handle.write(_fresh_line(handle) + data)
                handle.flush()
                os.fsync(handle.fileno())
            record = Record.from_json(line)
            self._records.setdefault(line["output"], []).append(record)


RECORD_START = '{"output": '
"""How every record's line begins (its keys are sorted): where a record glued to a cut
line starts (manifests written before records always began on a new line)."""


BAD = (0, "", None)
"""What ``_parse`` returns for a line that is JSON but not a record pisa wrote."""


def verdict(
    key: str,
    source: object,
    output: object,
    records: list[Record],
    record: Record | None,
    digest: Callable[[], str],
    known: bool | None = None,
) -> Decision:
    """Run or skip an ``output`` that exists: ``record`` is the one of ``records`` (those of
    its name) that its stamp matches, else the one of its bytes' ``digest`` (read only
    then); none is a file we did not write, or one changed since (``known``: its name has
    records; by default whether ``records`` is empty), and is kept."""
    if record is None and records:
        sha = digest()
        record = next((r for r in reversed(records) if r.output_sha256 == sha), None)
    if record is None:
        known = bool(records) if known is None else known
        why = "was changed after pisa wrote it" if known else "was not written by pisa"
        return Decision(SKIP, f"{output} exists and {why}: kept (--overwrite replaces it)")
    if record.key != key:
        return Decision(RUN, "settings changed")
    if source_stamp(source) != (record.source_bytes, record.source_mtime_ns):
        return Decision(RUN, "input changed")
    return Decision(SKIP, "up to date")


def _parse(text: str) -> tuple[int, str, Record] | tuple[int, str, None] | None:
    """(characters of a cut record before it, output name, record) of one line; BAD for a
    line of JSON that is not a record of ours; None when nothing can be read from it."""
    starts = [0]
    glued = text.find(RECORD_START, 1)  # a cut record's own start is at 0
    if glued > 0:
        starts.append(glued)
    found = None
    for start in starts:
        try:
            line = json.loads(text[start:])
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            continue
        try:
            return start, _text(line["output"]), Record.from_json(line)
        except (ValueError, KeyError, TypeError):
            found = BAD
    return found


def _integer(value: object, least: int | None = None) -> int:
    if type(value) is not int or (least is not None and value < least):  # bool is not one
        raise ValueError(f"not a count: {value!r}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"not a string: {value!r}")
    return value


def _digest(value: object) -> str:
    text = _text(value)
    if len(text) != 64 or text.strip("0123456789abcdef"):
        raise ValueError(f"not a SHA-256: {value!r}")
    return text


def _md5(value: object) -> str:
    """An optional MD5 field: lower case, or "" (the record stands, matched by SHA-256)."""
    return value.lower() if isinstance(value, str) and len(value) == 32 else ""


def _inside(name: str) -> bool:
    """Whether a recorded output name stays inside the folder (by its text: relative,
    without ``..``, as ``Manifest._name`` writes them)."""
    if not name or "\0" in name or name.startswith("/"):
        return False
    parts = name.split("/")
    return ".." not in parts and any(part not in ("", ".") for part in parts)


def _say_ignored(path: object, bad: int, outside: int) -> None:
    if bad:
        log.warning(
            "%s: %d record%s skipped: a field missing, of another type or out of range "
            "(not written by pisa)",
            path,
            bad,
            "" if bad == 1 else "s",
        )
    if outside:
        log.warning(
            "%s: %d record%s ignored: %s outside the folder (pisa never writes there)",
            path,
            outside,
            "" if outside == 1 else "s",
            "its output is" if outside == 1 else "their outputs are",
        )


FILE = "a file"


def manifest_files(root: Path) -> list[Path]:
    """The manifest files of ``root`` whatever they are (links, folders included): the main
    one, then each rank's, in rank order."""
    ranks = sorted(root.glob(RANK_MANIFEST_GLOB), key=_rank_of)
    main = root / MANIFEST_NAME
    return ([main] if os.path.lexists(main) else []) + ranks


def manifest_problem(root: Path) -> str | None:
    """The line saying why the manifest of ``root`` cannot be appended to (a link, a
    folder, a FIFO where a manifest file is), or None. Said before a run, not once per
    image."""
    for path in manifest_files(root):
        kind = kind_of(path)
        if kind is not None and "link" in kind:
            return (
                f"{path}: the manifest is {kind}, not a file; pisa never writes through a "
                "link in the output folder: remove the link"
            )
        if kind != FILE:
            return f"{path}: the manifest is {kind}, not a file: move it away"
    return None


def _fresh_line(handle: BinaryIO) -> bytes:
    """A newline to write first when the file (opened a+b) does not end with one: the
    last record was cut (our write failed, or another run was stopped while writing), and
    the next must not be glued to it."""
    end = handle.seek(0, os.SEEK_END)
    if end == 0:
        return b""
    handle.seek(end - 1)
    return b"" if handle.read(1) == b"\n" else b"\n"
