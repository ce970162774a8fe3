"""Progress display around the runner: a rich bar when stdout and stderr are terminals
(images done / total, images per second, time left, the file in the model), plain lines
otherwise (logs, CI), nothing but errors with --quiet. Failures and warnings are printed
as they happen, on stderr. A run on Ray shows the same display, fed by the results as
they stream back."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape as escape_markup
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pisa_cli.batch.display import Display, Result
from pisa_cli.imaging.names import shown


def escape(text: object) -> str:
    """Text for rich: one line (control characters from file names escaped, see
    ``imaging.names.shown``) with its square brackets kept literal."""
    return escape_markup(shown(text))


NAME_WIDTH = 40
"""Characters of the current file's name shown next to the bar."""


def _warnings(result: Result) -> list[str]:
    return list(getattr(result, "warnings", ()))


def _short(text: str, width: int = NAME_WIDTH) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


class QuietDisplay:
    """--quiet: failures only."""

    def __init__(self, console: Console):
        self.console = console

    def started(self, job: object) -> None:
        pass

    def show(self, name: str) -> None:
        pass

    def finished(self, result: Result) -> None:
        if result.status == "failed":
            self.console.print(f"[red]failed[/red] {escape(result.error)}", soft_wrap=True)

    def warn(self, text: str) -> None:
        pass


class LineDisplay:
    """One plain line per image, for logs: ``[3/40] done in/a.png -> out/a.png (2.1 s)``."""

    def __init__(self, total: int):
        self.total = total
        self.count = 0

    def _print(self, line: str) -> None:
        print(shown(line), file=sys.stderr, flush=True)

    def started(self, job: object) -> None:
        pass

    def show(self, name: str) -> None:
        pass

    def finished(self, result: Result) -> None:
        self.count += 1
        prefix = f"[{self.count}/{self.total}]"
        job = result.job
        if result.status == "failed":
            self._print(f"{prefix} failed {result.error}")
        else:
            source, output = job.source, job.output  # type: ignore[attr-defined]
            self._print(f"{prefix} {result.status} {source} -> {output} ({result.seconds:.1f} s)")
        for warning in _warnings(result):
            self.warn(f"{job.source}: {warning}")  # type: ignore[attr-defined]

    def warn(self, text: str) -> None:
        self._print(f"warning: {text}")


class BarDisplay:
    """A rich progress bar; failures and warnings are printed above it."""

    def __init__(self, console: Console, total: int):
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
        )
        self.progress = Progress(*columns, console=console, transient=False)
        self.task = self.progress.add_task("", total=total, rate="")
        self.start = time.perf_counter()
        self.done = 0

    def started(self, job: object) -> None:
        self.show(str(job.source))  # type: ignore[attr-defined]

    def show(self, name: str) -> None:
        """Name the file being worked on next to the bar."""
        self.progress.update(self.task, description=escape_markup(_short(shown(name))))

    def finished(self, result: Result) -> None:
        console = self.progress.console
        if result.status == "failed":
            console.print(f"[red]failed[/red] {escape(result.error)}", soft_wrap=True)
        for warning in _warnings(result):
            self.warn(f"{result.job.source}: {warning}")  # type: ignore[attr-defined]
        self.done += 1
        elapsed = time.perf_counter() - self.start
        rate = f"{self.done / elapsed:.2f} img/s" if elapsed > 0 else ""
        self.progress.update(self.task, advance=1, rate=rate)
        if self.done == self.progress.tasks[0].total:
            self.show("done")

    def warn(self, text: str) -> None:
        self.progress.console.print(f"[yellow]warning[/yellow] {escape(text)}", soft_wrap=True)


@contextmanager
def display(total: int, quiet: bool) -> Iterator[Display]:
    """The display for this run: quiet, a bar on a terminal, else plain lines."""
    console = Console(stderr=True)
    if quiet:
        yield QuietDisplay(console)
    elif console.is_terminal and sys.stdout.isatty():
        bar = BarDisplay(console, total)
        with bar.progress:
            yield bar
    else:
        yield LineDisplay(total)


def track(results: Iterable[Result], total: int, names: list[str], quiet: bool) -> Iterator[Result]:
    """Yield ``results`` unchanged while displaying them, for a runner without a start
    hook; ``names[i]`` is job i's input, shown as the current file."""
    with display(total, quiet) as screen:
        if names:
            screen.show(names[0])
        for index, result in enumerate(results):
            screen.finished(result)
            if index + 1 < len(names):
                screen.show(names[index + 1])
            yield result


def summary(counts: Counter, extra: str = "") -> str:
    """One line: done / skipped / failed (and anything else worth saying)."""
    text = f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
    return f"{text}{extra}"
