"""From the INPUT arguments to a sorted list of jobs: which file becomes which output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class Job:
    """One input image and the output file it becomes."""

    source: Path
    output: Path


@dataclass
class Discovery:
    """What the inputs held."""

    jobs: list[Job] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Inputs that do not exist."""
    skipped: list[Path] = field(default_factory=list)
    """Files in folders that are not images (by extension)."""


def image_extensions() -> set[str]:
    """File extensions Pillow can open (lower case, with the dot)."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def discover(inputs: Sequence[str | Path], output_dir: Path, extension: str = ".png") -> Discovery:
    """Files given directly are always tried; folders contribute the images they hold.

    The output of ``photo.jpg`` is ``output_dir/photo.png``. When several inputs share a
    stem (``a.png`` and ``a.jpg``), each of them keeps its extension in the name
    (``a_png.png``, ``a_jpg.png``), and a name met again from another folder gets ``-2``,
    ``-3``..., so that no output overwrites another.
    """
    found = Discovery()
    known = image_extensions()
    sources: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if not child.is_file() or child.name.startswith("."):
                    continue
                if child.suffix.lower() in known:
                    sources.append(child)
                else:
                    found.skipped.append(child)
        elif path.exists():
            sources.append(path)
        else:
            found.missing.append(str(item))
    unique = list(dict.fromkeys(sources))
    stems: dict[str, int] = {}
    for source in unique:
        stems[source.stem] = stems.get(source.stem, 0) + 1
    taken: set[str] = set()
    for source in unique:
        name = source.stem
        if stems[name] > 1:
            name = f"{name}_{source.suffix.lstrip('.').lower()}"
        candidate, number = name, 2
        while candidate.lower() in taken:  # same name from two folders
            candidate, number = f"{name}-{number}", number + 1
        taken.add(candidate.lower())
        found.jobs.append(Job(source=source, output=output_dir / f"{candidate}{extension}"))
    return found
