"""Progress display around the runner's iterator: a rich bar on a terminal, plain lines
otherwise, nothing but errors with --quiet. Failures are printed as they happen."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)


class Result(Protocol):
    status: str
    error: str
    seconds: float

    @property
    def job(self) -> object: ...


def track(results: Iterable[Result], total: int, names: list[str], quiet: bool) -> Iterator[Result]:
    """Yield ``results`` unchanged while showing progress; ``names[i]`` is job i's input."""
    console = Console(stderr=True)
    if quiet:
        for result in results:
            _report_failure(console, result)
            yield result
    elif console.is_terminal:
        yield from _bar(console, results, total, names)
    else:
        yield from _lines(results, total)


def _report_failure(console: Console, result: Result) -> None:
    if result.status == "failed":
        console.print(
            f"[red]failed[/red] {result.error}", markup=True, highlight=False, soft_wrap=True
        )


def _bar(
    console: Console, results: Iterable[Result], total: int, names: list[str]
) -> Iterator[Result]:
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}", justify="left"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    start = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as progress:
        first = names[0] if names else ""
        task = progress.add_task(first, total=total, rate="")
        for index, result in enumerate(results):
            _report_failure(progress.console, result)
            elapsed = time.perf_counter() - start
            rate = f"{(index + 1) / elapsed:.2f} img/s" if elapsed > 0 else ""
            upcoming = names[index + 1] if index + 1 < len(names) else "done"
            progress.update(task, advance=1, description=upcoming, rate=rate)
            yield result


def _lines(results: Iterable[Result], total: int) -> Iterator[Result]:
    for index, result in enumerate(results):
        job = result.job
        prefix = f"[{index + 1}/{total}]"
        if result.status == "failed":
            line = f"{prefix} failed {result.error}"
        else:
            line = f"{prefix} {result.status} {job.source} -> {job.output} ({result.seconds:.1f} s)"  # type: ignore[attr-defined]
        print(line, file=sys.stderr, flush=True)
        yield result


def summary(counts: Counter, extra: str = "") -> str:
    """One line: done / skipped / failed (and anything else worth saying)."""
    text = f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
    return f"{text}{extra}"
