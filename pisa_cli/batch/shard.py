"""`--shard K/N`: this process's deterministic share of a batch, with no engine and no
talk between the processes (Slurm job arrays, Kubernetes indexed jobs, and the ranks of
torchrun / accelerate launch / srun, which map to ``--shard RANK/WORLD_SIZE``).

An input belongs to share ``K`` when a hash of its output's path (relative to -o) is ``K``
modulo ``N``: every process decides alone, whatever it listed first, whatever the manifest
holds, and a rerun with the same N gives each output the same process. No header is read
(a million inputs cost no I/O to split); the shares are even in count, statistically. Each
share appends to its own manifest part (``.pisa-manifest.rankK.jsonl``, shard 0 to the main
file) and writes its own report part, so nothing is shared but the output folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pisa_cli.errors import OptionsError


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise OptionsError(
                f"--shard {self.index}/{self.count}: expected K/N with 0 <= K < N (0-based)"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``3/8`` -> Shard(3, 8) (raises OptionsError)."""
        index, slash, count = text.strip().partition("/")
        if not slash or not index.strip().isdigit() or not count.strip().isdigit():
            raise OptionsError(f"--shard {text}: expected K/N, e.g. 0/4 (K counts from 0)")
        return cls(int(index), int(count))

    @property
    def whole(self) -> bool:
        return self.count == 1

    def holds(self, output: Path, root: Path) -> bool:
        """Whether the job writing ``output`` (under the output folder ``root``) is ours."""
        if self.whole:
            return True
        try:
            name = output.relative_to(root).as_posix()
        except ValueError:
            name = output.as_posix()
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def report_path(self, report: Path) -> Path:
        """Where this share writes ``--report``: ``report.json`` -> ``report.shard3of8.json``
        (every share its own part; ``pisa report-merge`` sums them up)."""
        if self.whole:
            return report
        return report.with_name(f"{report.stem}.shard{self.index}of{self.count}{report.suffix}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
