"""The manifest of an output prefix on object storage, where nothing can be appended to.

Each writer (a process, a --shard share, a Ray worker) has a run id of its own and puts
each record as an object of its own, ``OUT/.pisa-manifest/<run>-<rank>-<n>.jsonl``, before
the output's single PUT: an output visible at its key always has its record. When the
writer is done (the end of a run, of a Ray task) it gathers its records into one part,
``<run>-<rank>-c<k>.jsonl``, and deletes the single ones; a killed writer leaves its
single records, which count all the same. At plan time every part under the prefix is
read and merged, with the local manifest's rules: each record checked field by field,
records naming an output outside the prefix ignored with one warning.

An existing output is the one a record describes when its size matches and its ETag (the
MD5 of a single PUT on S3, MinIO, R2) is the record's ``output_md5``; otherwise (multipart
or encrypted objects) its bytes are fetched and their SHA-256 compared. Inputs count as
changed when their size or modification time (in whole seconds: listings and HEADs differ
below) differ from the record's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from pathlib import Path

from pisa_cli.imaging.manifest import RUN, Decision, Manifest, Record, verdict
from pisa_cli.imaging.objects import ObjectPath

log = logging.getLogger(__name__)

PARTS = ".pisa-manifest"
"""The prefix under -o holding the manifest's parts (hidden: never taken as input)."""


def open_manifest(root: Path | ObjectPath, settings: dict | None = None, rank: int = 0) -> Manifest:
    """The manifest of the output folder or prefix ``root`` (``rank``: the writer's part)."""
    if isinstance(root, ObjectPath):
        return ObjectManifest(root, settings, rank)
    return Manifest(root, settings, rank)


class ObjectManifest(Manifest):
    """``Manifest`` on object storage: parts read at once, records put one by one."""

    def __init__(self, root: ObjectPath, settings: dict | None = None, rank: int = 0):
        super().__init__(root, settings, rank)  # type: ignore[arg-type]  # no files: parts
        self.folder = root / PARTS
        self.run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
        self.path = self.folder / f"{self.run}-{rank}"
        self._singles: list[ObjectPath] = []
        self._lines: list[bytes] = []
        self._gathered = 0
        self._listing: dict[str, dict] | None = None
        fs = root.fs
        fs.invalidate_cache()  # another writer (or a rerun) may have changed the prefix
        try:
            names = [name for name in sorted(fs.find(self.folder.key)) if name.endswith(".jsonl")]
            texts = fs.cat(names, on_error="omit") if names else {}
        except OSError as error:  # its outputs then count as not written by pisa: kept
            log.warning("%s: cannot read the manifest (%s)", self.folder, error)
            texts = {}
        for name in sorted(texts):
            lines = texts[name].decode("utf-8", "replace").splitlines()
            self._take(ObjectPath(root.protocol, name), lines)

    def files(self) -> list[Path]:
        return []

    def _name(self, output: ObjectPath) -> str:  # type: ignore[override]
        try:
            return output.relative_to(self.root).as_posix()
        except ValueError:
            return str(output)

    def outputs(self) -> set[ObjectPath]:  # type: ignore[override]
        return {self.root / name for name in self._records}

    def _info(self, output: ObjectPath) -> dict | None:
        if self._listing is None:  # the whole prefix in one listing, not a HEAD per output
            try:
                self._listing = self.root.fs.find(self.root.key, detail=True)
            except OSError:
                self._listing = {}
        return self._listing.get(output.key)

    def decide(self, source, output, overwrite: bool = False) -> Decision:  # type: ignore[override]
        """Run or skip ``source`` -> ``output`` (an object) under this manifest's settings."""
        info = self._info(output)
        if info is None:
            return Decision(RUN, "new")
        if overwrite:
            return Decision(RUN, "--overwrite")
        size = int(info.get("size") or 0)
        etag = str(info.get("ETag") or info.get("md5Hash") or "").strip('"').lower()
        records = [r for r in self._records.get(self._name(output), []) if r.output_bytes == size]
        same = (r for r in reversed(records) if r.output_md5 and r.output_md5 == etag)
        return verdict(
            self.key, source, output, records, next(same, None),
            lambda: hashlib.sha256(output.read_bytes()).hexdigest(),
            known=self._name(output) in self._records,
        )  # fmt: skip

    def record(self, source, output, written: bytes) -> None:  # type: ignore[override]
        """Put the record of ``written`` (the bytes about to become ``output``) as an object
        of its own. Called from writer threads, before the output's PUT."""
        line = self._line(
            source, output, len(written), 0, hashlib.sha256(written).hexdigest(),
            output_md5=hashlib.md5(written, usedforsecurity=False).hexdigest(),
        )  # fmt: skip
        data = (json.dumps(line, sort_keys=True, default=str) + "\n").encode("utf-8")
        with self._lock:
            single = self.folder / f"{self.path.name}-{len(self._lines) + 1:06d}.jsonl"
            single.write_bytes(data)
            self._singles.append(single)
            self._lines.append(data)
            self._records.setdefault(line["output"], []).append(Record.from_json(line))

    def close(self) -> None:
        """Gather this writer's single records into one part and delete them."""
        with self._lock:
            singles, self._singles = self._singles, []
            if not singles:
                return
            self._gathered += 1
            part = self.folder / f"{self.path.name}-c{self._gathered}.jsonl"
            lines = self._lines[len(self._lines) - len(singles) :]
            part.write_bytes(b"".join(lines))
        try:
            self.root.fs.rm([single.key for single in singles])
        except OSError as error:  # they still count, as duplicates
            log.debug("%s: single records left (%s)", self.folder, error)
