"""Discovery's rules on object storage: an INPUT URL is an object (always tried), a prefix
(the object store's folder: its images by extension, sub-prefixes with ``--recursive``,
mirrored under -o) or a glob pattern (``s3://b/in/**/*.png``). Hidden names (a part that
starts with a dot: our manifest parts and probes) are left out, the output prefix is never
read as input, and the order is the local one (natural order, part by part).
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from pisa_cli.imaging.names import safe_stem
from pisa_cli.imaging.objects import ObjectPath, listed


def walk_object_input(walk: Any, item: ObjectPath, natural_key: Callable[[str], list]) -> None:
    """Add what the URL ``item`` names to ``walk`` (a discover._Walk), in the order of
    ``natural_key`` (discovery's)."""
    fs = item.fs
    try:
        info = fs.info(item.key)
    except FileNotFoundError:
        info = None
    except OSError as error:
        walk.found.unreadable.append(f"{item}: cannot list ({error.strerror or error})")
        return
    if info is not None and info.get("type") == "directory":
        _prefix(walk, item, Path(), natural_key)
    elif info is not None:
        walk.add(listed(item.protocol, info), Path(), named=True)
    elif glob.has_magic(item.key):
        _pattern(walk, item, natural_key)
    else:
        walk.found.missing.append(str(item))


def _order(
    entries: dict[str, dict], root: str, natural_key: Callable[[str], list]
) -> list[tuple[tuple[str, ...], dict]]:
    """(parts below ``root``, info) of each object, hidden ones left out, in natural order
    part by part (as the local walk, folder by folder)."""
    found = []
    for name, info in entries.items():
        parts = tuple(PurePosixPath(name.rstrip("/")).relative_to(root).parts)
        if parts and not any(part.startswith(".") for part in parts):
            found.append((parts, info))
    found.sort(key=lambda entry: [natural_key(part) for part in entry[0]])
    return found


def _prefix(walk: Any, prefix: ObjectPath, relative: Path, natural_key: Callable) -> None:
    """The images under ``prefix``: every level with ``--recursive``, else its own (its
    sub-prefixes counted as not searched)."""
    fs, output = prefix.fs, walk.output_dir
    try:
        if walk.recursive:
            entries = fs.find(prefix.key, withdirs=False, detail=True)
        else:
            entries = {info["name"]: info for info in fs.ls(prefix.key, detail=True)}
    except OSError as error:
        walk.found.unreadable.append(f"{prefix}: cannot list ({error.strerror or error})")
        return
    below_output = isinstance(output, ObjectPath) and output.is_relative_to(prefix)
    below_output = below_output and output != prefix
    for parts, info in _order(entries, prefix.key, natural_key):
        found = listed(prefix.protocol, info)
        if below_output and found.is_relative_to(output):  # our outputs are never inputs
            continue
        if info.get("type") == "directory":
            walk.found.unsearched.append(found)
        elif not info["name"].endswith("/"):
            below = Path(*map(safe_stem, parts[:-1])) if parts[:-1] else Path()
            walk.candidate(found, relative / below)


def _pattern(walk: Any, pattern: ObjectPath, natural_key: Callable) -> None:
    """Matches of a glob pattern; with ``--recursive`` they keep their place below the
    pattern's fixed start."""
    fs = pattern.fs
    try:
        matches = fs.glob(pattern.key, detail=True)
    except OSError as error:
        walk.found.unreadable.append(f"{pattern}: cannot list ({error.strerror or error})")
        return
    fixed = []
    for part in PurePosixPath(pattern.key).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    base = str(PurePosixPath(*fixed)) if fixed else ""
    ordered = _order(matches, base or "/", natural_key)
    if not ordered:
        walk.found.missing.append(str(pattern))
    for parts, info in ordered:
        match = listed(pattern.protocol, info)
        relative = Path()
        if walk.recursive and len(parts) > 1:
            relative = Path(*map(safe_stem, parts[:-1]))
        if info.get("type") == "directory":
            below = relative / safe_stem(match.name) if walk.recursive else relative
            _prefix(walk, match, below, natural_key)
        else:
            walk.candidate(match, relative)
