"""`pisa bench`: scenarios on the real SD 2.1-base architecture with random weights.

The architecture comes from the configs shipped in the package, so anyone can measure their
machine before downloading 5 GB. Scenarios print figures; they assert nothing. Timings are
noisy: compare two things measured in the same run.
"""

from __future__ import annotations

import gc
import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pisa_cli.models.device import synchronize


@dataclass
class Row:
    """One measured line of a scenario."""

    scenario: str
    case: str
    seconds: float
    peak_bytes: int | None = None
    """Peak resident memory above the level at the start of the case (CPU), or the peak
    allocated on the CUDA device."""
    figures: dict[str, float | str] = field(default_factory=dict)


class PeakMemory:
    """Peak memory of a block: RSS high-water mark on Linux, allocator peak on CUDA, and on
    an accelerator the host's RSS peak as well (``host_peak``: the tiled VAE's planes and
    every buffer kept on the host)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.host_peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        _trim_heap()
        _reset_rss_peak()
        self._host_base = _rss()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.host_peak = _rss()[1] - self._host_base
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak = self.host_peak


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes (Linux /proc), or (0, 0) elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


def _reset_rss_peak() -> None:
    with suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _trim_heap() -> None:
    # Freed memory stays in the process's heap; give it back so a peak starts from here.
    from pisa_cli.models.device import glibc_function

    malloc_trim = glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


@contextmanager
def measured(rows: list[Row], scenario: str, case: str, device: torch.device) -> Iterator[Row]:
    row = Row(scenario, case, 0.0)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        yield row
        synchronize(device)  # the clock stops when the queued GPU work is done, not before
        row.seconds = time.perf_counter() - start
    row.peak_bytes = peak.peak
    if device.type != "cpu":
        row.figures["host_peak_gib"] = peak.host_peak / 2**30
    rows.append(row)


SCENARIOS: dict[str, Callable[..., list[Row]]] = {}


def scenario(name: str) -> Callable:
    def register(function: Callable[..., list[Row]]) -> Callable[..., list[Row]]:
        SCENARIOS[name] = function
        return function

    return register


def machine() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
    }


def format_table(rows: list[Row]) -> str:
    lines = [f"{'scenario':<18} {'case':<34} {'seconds':>9} {'peak GiB':>9}  figures"]
    for row in rows:
        peak = "" if row.peak_bytes is None else f"{row.peak_bytes / 2**30:.2f}"
        figures = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.figures.items()
        )
        lines.append(f"{row.scenario:<18} {row.case:<34} {row.seconds:>9.2f} {peak:>9}  {figures}")
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path) -> None:
    payload = {
        "machine": machine(),
        "rows": [row.__dict__ for row in rows],
    }
    path.write_text(json.dumps(payload, indent=2))
