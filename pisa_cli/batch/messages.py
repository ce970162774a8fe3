"""What the ranks of one run tell each other through the store, as plain JSON data.

Rank 0 hands each rank its share (``Share``: jobs, why each runs, the manifest settings);
each rank sends back its report (``RankReport``: one result per job it ran). The store
is a network service without authentication (anyone who reaches its port can set a key),
so nothing read from it is trusted: no pickles, only JSON of the expected shape, checked
field by field and rebuilt into our own objects here. A value that does not fit raises
MalformedMessage, which loses that rank (one line), never the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pisa_cli.batch.runner import DONE, FAILED, SKIPPED, JobResult
from pisa_cli.imaging.discover import Job


class MalformedMessage(ValueError):
    """A value in the store is not the plain data it should be; says what is wrong."""


def _fields(value: object, names: Sequence[str], what: str) -> Mapping[str, Any]:
    """``value`` as a JSON object with exactly ``names`` as its keys."""
    if not isinstance(value, dict):
        raise MalformedMessage(f"{what} is not an object")
    if set(value) != set(names):
        odd = sorted(set(value) ^ set(names))[0]
        raise MalformedMessage(f"{what}: unexpected or missing field {odd[:40]!r}")
    return value


def _integer(value: object, what: str, low: int = 0, high: int = 2**53) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MalformedMessage(f"{what} is not a whole number from {low} to {high}")
    return value


def _number(value: object, what: str) -> float:
    """A finite number of seconds, 0 or more."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise MalformedMessage(f"{what} is not a number")
    if not math.isfinite(value) or value < 0:
        raise MalformedMessage(f"{what} is not a finite number of seconds")
    return float(value)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedMessage(f"{what} is not a string")
    return value


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise MalformedMessage(f"{what} is not true or false")
    return value


def _texts(value: object, what: str) -> list[str]:
    if not isinstance(value, list):
        raise MalformedMessage(f"{what} is not a list")
    return [_text(item, what) for item in value]


def _size(value: object, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise MalformedMessage(f"{what} is not a [width, height] pair")
    return _integer(value[0], what, 1), _integer(value[1], what, 1)


RESULT_FIELDS = (
    "job",
    "status",
    "error",
    "reason",
    "seconds",
    "input_size",
    "output_size",
    "input_mode",
    "timings",
    "notes",
    "warnings",
    "batch",
)


def result_to_plain(result: JobResult, index: int) -> dict[str, object]:
    """``result`` as JSON data; its job as ``index``, its place in the share (paths are
    never taken back from another rank)."""
    return {
        "job": index,
        "status": result.status,
        "error": result.error,
        "reason": result.reason,
        "seconds": result.seconds,
        "input_size": list(result.input_size) if result.input_size else None,
        "output_size": list(result.output_size) if result.output_size else None,
        "input_mode": result.input_mode,
        "timings": dict(result.timings),
        "notes": list(result.notes),
        "warnings": list(result.warnings),
        "batch": result.batch,
    }


def result_from_plain(value: object, jobs: Sequence[Job]) -> JobResult:
    """The JobResult ``value`` describes, for one of ``jobs`` (the share it was handed)."""
    data = _fields(value, RESULT_FIELDS, "a result")
    status = _text(data["status"], "a result's status")
    if status not in (DONE, SKIPPED, FAILED):
        raise MalformedMessage(f"a result's status {status[:20]!r} is not done, skipped or failed")
    timings = data["timings"]
    if not isinstance(timings, dict):
        raise MalformedMessage("a result's timings are not an object")
    return JobResult(
        job=jobs[_integer(data["job"], "a result's job", 0, len(jobs) - 1)],
        status=status,
        error=_text(data["error"], "a result's error"),
        reason=_text(data["reason"], "a result's reason"),
        seconds=_number(data["seconds"], "a result's seconds"),
        input_size=_size(data["input_size"], "a result's input size"),
        output_size=_size(data["output_size"], "a result's output size"),
        input_mode=_text(data["input_mode"], "a result's input mode"),
        timings={stage: _number(s, "a result's timing") for stage, s in timings.items()},
        notes=_texts(data["notes"], "a result's notes"),
        warnings=_texts(data["warnings"], "a result's warnings"),
        batch=_integer(data["batch"], "a result's batch", 1, 2**16),
    )


@dataclass(frozen=True)
class Share:
    """What rank 0 hands one rank."""

    jobs: tuple = ()
    reasons: dict = field(default_factory=dict)
    """Why each job runs (new, settings changed, ...), for the report."""
    settings: dict = field(default_factory=dict)
    """The manifest settings the outputs are recorded with (plain JSON data)."""
    exit_code: int | None = None
    """Rank 0 stopped before the run (no images, bad weights): exit with this code."""

    def to_plain(self) -> dict[str, object]:
        return {
            "jobs": [[str(job.source), str(job.output)] for job in self.jobs],
            "reasons": [self.reasons[job] for job in self.jobs],
            "settings": self.settings,
            "exit_code": self.exit_code,
        }

    @classmethod
    def from_plain(cls, value: object, output: Path) -> Share:
        """The share ``value`` describes; every output must lie inside ``output`` (the
        folder this rank was told to write to), so the store cannot send writes elsewhere."""
        data = _fields(value, ("jobs", "reasons", "settings", "exit_code"), "the share")
        if not isinstance(data["jobs"], list) or not isinstance(data["reasons"], list):
            raise MalformedMessage("the share's jobs or reasons are not lists")
        if len(data["jobs"]) != len(data["reasons"]):
            raise MalformedMessage("the share has not one reason per job")
        if not isinstance(data["settings"], dict):
            raise MalformedMessage("the share's settings are not an object")
        code = data["exit_code"]
        jobs = tuple(_job(item, output) for item in data["jobs"])
        reasons = [_text(reason, "a job's reason") for reason in data["reasons"]]
        return cls(
            jobs=jobs,
            reasons=dict(zip(jobs, reasons, strict=True)),
            settings=data["settings"],
            exit_code=None if code is None else _integer(code, "the exit code", 0, 255),
        )


def _job(value: object, output: Path) -> Job:
    if not isinstance(value, list) or len(value) != 2:
        raise MalformedMessage("a job is not a [source, output] pair")
    source, target = (Path(_text(part, "a job's path")) for part in value)
    if "\x00" in str(source) or "\x00" in str(target):
        raise MalformedMessage("a job's path holds a NUL character")
    # by name, not resolved: a symlinked sub-folder of the output folder is still inside
    inside = os.path.normpath(os.path.abspath(target)).startswith(
        os.path.join(os.path.normpath(os.path.abspath(output)), "")
    )
    if not inside:
        raise MalformedMessage(f"a job's output {str(target)[:200]!r} is not inside {output}")
    return Job(source, target)


REPORT_FIELDS = ("results", "not_done", "interrupted", "run_seconds", "failed_to_start")


@dataclass(frozen=True)
class RankReport:
    """What one rank sends rank 0 at the end."""

    results: list = field(default_factory=list)
    not_done: int = 0
    interrupted: bool = False
    run_seconds: float = 0.0
    """From its first image into the model to its last written."""
    failed_to_start: bool = False
    """The model did not load on this rank (its own error line says why)."""

    def to_plain(self, jobs: Sequence[Job]) -> dict[str, object]:
        """As JSON data; ``jobs``: the share the results are of, in the order handed out."""
        index = {job: number for number, job in enumerate(jobs)}
        return {
            "results": [result_to_plain(result, index[result.job]) for result in self.results],
            "not_done": self.not_done,
            "interrupted": self.interrupted,
            "run_seconds": self.run_seconds,
            "failed_to_start": self.failed_to_start,
        }

    @classmethod
    def from_plain(cls, value: object, jobs: Sequence[Job]) -> RankReport:
        """The report ``value`` describes, from the rank that was handed ``jobs``."""
        data = _fields(value, REPORT_FIELDS, "the report")
        if not isinstance(data["results"], list) or len(data["results"]) > len(jobs):
            raise MalformedMessage(f"the report's results are not a list of at most {len(jobs)}")
        results = [result_from_plain(item, jobs) for item in data["results"]]
        if len({result.job for result in results}) != len(results):
            raise MalformedMessage("the report has two results for one job")
        return cls(
            results=results,
            not_done=_integer(data["not_done"], "the report's not_done", 0, len(jobs)),
            interrupted=_flag(data["interrupted"], "the report's interrupted"),
            run_seconds=_number(data["run_seconds"], "the report's run_seconds"),
            failed_to_start=_flag(data["failed_to_start"], "the report's failed_to_start"),
        )
