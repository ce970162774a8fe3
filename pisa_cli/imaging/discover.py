"""From the INPUT arguments to a sorted list of jobs: which file becomes which output.

Inputs are files (always tried), folders (their images; with ``recursive`` their sub-folders
too, mirrored in the output folder) and glob patterns (``'shots/**/*.jpg'``). Only paths
are listed here; images are decoded one at a time later, so a folder of any length costs
a list of names.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pisa_cli.imaging.formats import output_extension
from pisa_cli.imaging.names import safe_stem
from pisa_cli.imaging.object_walk import walk_object_input
from pisa_cli.imaging.objects import ObjectPath, is_url
from pisa_cli.options import BatchOptions


@dataclass(frozen=True)
class Job:
    """One input image and the output file it becomes (either may be an object: see
    ``imaging.objects``)."""

    source: Path | ObjectPath
    output: Path | ObjectPath


@dataclass
class Discovery:
    """What the inputs held."""

    jobs: list[Job] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Inputs that do not exist (or patterns that match nothing)."""
    skipped: list[Path] = field(default_factory=list)
    """Files in folders (or matched by patterns) that are not images, by extension."""
    unsearched: list[Path] = field(default_factory=list)
    """Sub-folders left out because ``recursive`` was off."""
    conflicts: list[Job] = field(default_factory=list)
    """Jobs whose output would replace their own input; they are not run."""
    unreadable: list[str] = field(default_factory=list)
    """Inputs that cannot be taken (folders that cannot be listed, named files that are not
    regular files, outputs that would land outside the output folder), one line each."""
    loops: list[str] = field(default_factory=list)
    """Folders reached again through a symbolic link (not walked again), one line each."""


def natural_key(text: str) -> list:
    """Sort key that puts ``img2`` before ``img10`` (numbers compared as numbers)."""
    parts = re.split(r"(\d+)", text.lower())
    return [int(part) if part.isdigit() else part for part in parts]


def image_extensions() -> set[str]:
    """File extensions Pillow can open (lower case, with the dot)."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


@dataclass
class _Walk:
    output_dir: Path
    recursive: bool
    exclude: Collection[Path]
    known: set[str] = field(default_factory=image_extensions)
    found: Discovery = field(default_factory=Discovery)
    sources: dict[Path, tuple[Path, Path]] = field(default_factory=dict)
    """resolved path -> (source as given, sub-folder of the output), in discovery order."""
    visited: set[Path] = field(default_factory=set)
    """Real paths of the folders walked so far: a symbolic link back to one is a loop."""

    def add(self, path: Path, relative: Path, named: bool = False) -> None:
        """Take ``path``; files found in folders or by patterns are left out when excluded,
        files named on the command line never are."""
        key = path.resolve()
        if named or key not in self.exclude:
            self.sources.setdefault(key, (path, relative))

    def loop(self, folder: object, real: object) -> None:
        """Say once that ``folder`` leads back to ``real``, a folder already searched."""
        line = f"{folder}: a link to a folder already searched ({real})"
        if line not in self.found.loops:
            self.found.loops.append(line)

    def folder(self, folder: Path, relative: Path) -> None:
        real = folder.resolve()
        if real in self.visited:
            self.loop(folder, real)
            return
        self.visited.add(real)
        try:
            children = sorted(folder.iterdir(), key=lambda child: natural_key(child.name))
        except OSError as error:
            self.found.unreadable.append(f"{folder}: cannot list ({error.strerror or error})")
            return
        for child in children:
            if child.name.startswith("."):  # hidden files, our manifest and temporary files
                continue
            if child.is_dir():
                if child.resolve() == self.output_dir:  # our outputs are never inputs
                    continue
                if self.recursive:
                    self.folder(child, relative / safe_stem(child.name))
                else:
                    self.found.unsearched.append(child)
            elif child.is_file():
                self.candidate(child, relative)

    def candidate(self, path: Path, relative: Path) -> None:
        if path.suffix.lower() in self.known:
            self.add(path, relative)
        else:
            self.found.skipped.append(path)

    def pattern(self, pattern: str) -> None:
        """Matches of a glob pattern (``**`` spans folders); with ``recursive`` they keep their
        place below the pattern's fixed start (``in`` for ``in/**/*.png``)."""
        matches = sorted(expand(pattern, self.loop), key=natural_key)
        if not matches:
            self.found.missing.append(pattern)
        base = _fixed_start(pattern)
        for match in map(Path, matches):
            relative = Path()
            if self.recursive and match.parent.is_relative_to(base):
                relative = Path(*map(safe_stem, match.parent.relative_to(base).parts))
            if match.is_dir():
                if self.recursive and match.resolve() in self.visited:
                    continue  # searched already, as a sub-folder of an earlier match
                below = relative / safe_stem(match.name) if self.recursive else relative
                self.folder(match, below)
            elif match.is_file():
                self.candidate(match, relative)


def expand(pattern: str, loop: Callable[[str, str], None]) -> list[str]:
    """The paths ``glob.glob(pattern, recursive=True)`` gives, except that a ``**`` enters
    each folder once: a link back to one already searched is said (``loop``) and left, as
    ``-r`` does. (Python's glob follows such links without end: two links to ``.`` never
    finish, one gives ``in/a/a/a/...`` forty deep.)"""
    parts = pattern.replace(os.altsep or os.sep, os.sep).split(os.sep)
    if "**" not in parts:  # each part one level: glob ends
        return glob.glob(pattern, recursive=True)
    start = os.sep if pattern.startswith(os.sep) else ""
    dirs_only = parts[-1] == ""  # a pattern ending in "/" matches folders only
    parts = [part for part in parts if part]
    found: list[str] = []
    seen: set[tuple[str, int]] = set()

    def walk(here: str, index: int) -> None:
        if index == len(parts):
            found.append(here)
            return
        part, last = parts[index], index == len(parts) - 1
        folder = here or os.curdir
        prefix = here if not here or here.endswith(os.sep) else here + os.sep
        if part == "**":
            if not os.path.isdir(folder):
                return
            real = os.path.realpath(folder)
            if (real, index) in seen:
                if os.path.islink(here):
                    loop(here, real)
                return
            seen.add((real, index))
            walk(here, index + 1)  # "**" matches no folder too
            for name in _names(folder, hidden=False):
                path = prefix + name
                if os.path.isdir(path):
                    walk(path, index)
                elif last:
                    found.append(path)
        elif glob.has_magic(part):
            for name in fnmatch.filter(_names(folder, part.startswith(".")), part):
                walk(prefix + name, index + 1)
        elif os.path.lexists(prefix + part):
            walk(prefix + part, index + 1)

    walk(start, 0)
    if dirs_only:
        return [path + os.sep for path in found if os.path.isdir(path)]
    return found


def _names(folder: str, hidden: bool) -> list[str]:
    """The names in ``folder`` (none when it cannot be listed), hidden ones only when asked
    (glob's rule: ``*`` and ``**`` skip them)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    names.sort(key=natural_key)  # loops said in the order -r says them
    return names if hidden else [name for name in names if not name.startswith(".")]


def _fixed_start(pattern: str) -> Path:
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path()


def discover(
    inputs: Sequence[str | Path | ObjectPath],
    output_dir: Path | ObjectPath,
    extension: str = ".png",
    *,
    batch: BatchOptions | None = None,
    exclude: Collection[Path] = (),
) -> Discovery:
    """Jobs for ``inputs``: the output of ``photo.jpg`` is ``output_dir/photo.png``.

    With ``batch``, its format (``same`` keeps each input's extension), suffix and
    ``recursive`` apply instead of ``extension``. ``exclude`` holds resolved paths that
    folders and patterns never contribute (the outputs of earlier runs, from the manifest);
    files named directly are always taken. Name collisions never overwrite: see
    ``_name_outputs``.
    """
    walk = _Walk(output_dir.resolve(), bool(batch and batch.recursive), frozenset(exclude))
    for item in inputs:
        if isinstance(item, ObjectPath) or is_url(item):
            url = item if isinstance(item, ObjectPath) else ObjectPath.parse(str(item))
            walk_object_input(walk, url, natural_key)
            continue
        path = Path(item)
        if path.is_dir():
            walk.folder(path, Path())
        elif path.is_file():
            walk.add(path, Path(), named=True)
        elif path.exists():  # a FIFO would block the reader forever, a device never end
            walk.found.unreadable.append(f"{path}: not a regular file or a folder")
        elif glob.has_magic(str(item)):
            walk.pattern(str(item))
        else:
            walk.found.missing.append(str(item))
    found = walk.found
    root = output_dir.resolve()
    for job in _name_outputs(list(walk.sources.values()), output_dir, extension, batch):
        if not _lands_inside(job.output, root):
            found.unreadable.append(
                f"{job.source}: its output {job.output} would land outside {output_dir} "
                "(a link in the output folder leads elsewhere); not run"
            )
            continue
        same = job.output.resolve() == job.source.resolve()
        (found.conflicts if same else found.jobs).append(job)
    return found


def _lands_inside(output: Path, root: Path) -> bool:
    """Whether ``output`` is written inside ``root``, links followed: its folder is resolved
    (the file itself is replaced, never followed, by the atomic rename)."""
    if output.name in ("", ".", ".."):
        return False
    return output.parent.resolve().is_relative_to(root)


def _name_outputs(
    sources: list[tuple[Path, Path]],
    output_dir: Path,
    extension: str,
    batch: BatchOptions | None,
) -> list[Job]:
    """Output paths that never collide (names compared without case, for macOS and Windows).

    Stems that are empty or start with a dot (``..`` from ``...png``) get ``_`` in front
    (``safe_stem``), so no output is hidden or climbs out of the output folder.

    Inputs that would share an output name and differ in extension keep it in the name
    (``a.png`` and ``a.jpg`` -> ``a_png.png``, ``a_jpg.png``); a name met again (the same
    name from two folders) gets ``-2``, ``-3``... in input order.
    """
    suffix = batch.write.suffix if batch else ""

    def ext_of(source: Path) -> str:
        return output_extension(batch.write.format, source) if batch else extension

    groups: dict[tuple[Path, str], set[str]] = {}
    for source, relative in sources:
        key = (relative, f"{safe_stem(source.stem)}{ext_of(source)}".lower())
        groups.setdefault(key, set()).add(source.suffix.lower())
    taken: set[tuple[Path, str]] = set()
    jobs = []
    for source, relative in sources:
        ext = ext_of(source)
        stem = safe_stem(source.stem)
        if len(groups[(relative, f"{stem}{ext}".lower())]) > 1:
            stem = f"{stem}_{source.suffix.lstrip('.').lower()}"
        candidate, number = stem, 2
        while (relative, f"{candidate}{suffix}{ext}".lower()) in taken:
            candidate, number = f"{stem}-{number}", number + 1
        taken.add((relative, f"{candidate}{suffix}{ext}".lower()))
        jobs.append(Job(source=source, output=output_dir / relative / f"{candidate}{suffix}{ext}"))
    return jobs
