"""What a run tells as it goes, and what it tells of: the one ``Display`` protocol (the CLI's
progress bar, plain lines, quiet; a test's fake) and the one ``Result`` protocol it reads
(``runner.JobResult`` of `pisa upscale`, ``SweepResult`` of `pisa sweep`)."""

from __future__ import annotations

from typing import Protocol


class Result(Protocol):
    """One input's outcome, as a display reads it (a ``warnings`` list too, when it has one)."""

    status: str
    """done, skipped or failed."""
    error: str
    """One line naming the file and the reason, when failed."""
    seconds: float

    @property
    def job(self) -> object: ...  # an imaging.discover.Job: .source, .output


class Display(Protocol):
    """What the batch and the sweep tell as they go."""

    def started(self, job: object) -> None:
        """An input went into the model."""

    def show(self, name: str) -> None:
        """Name the file being worked on."""

    def finished(self, result: Result) -> None:
        """An input's outcome (failures said as they happen)."""

    def warn(self, text: str) -> None: ...
