"""``--report``: what happened to each image, as JSON or CSV (picked by the extension).

Each image: input, output, status, error, why it ran or was skipped, the model family that
ran (pisa-sr or omgsr, from the run's settings), input mode, input and output sizes (pixels
and bytes), seconds per stage (a stage shared by a batch of images counts a share for each),
the images in its model calls (``batch``), notes. JSON adds the run's summary and
settings. The file is written atomically at the end of the run, Ctrl-C included.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from pisa_cli.errors import OptionsError
from pisa_cli.fsutil import atomic_path
from pisa_cli.imaging.names import csv_cell

STAGES = ("read", "preprocess", "text", "encode", "unet", "decode", "color", "compose", "write")
COLUMNS = (
    "input",
    "output",
    "status",
    "error",
    "reason",
    "family",
    "input_mode",
    "input_width",
    "input_height",
    "input_bytes",
    "output_width",
    "output_height",
    "output_bytes",
    "seconds",
    "batch",
    *(f"{stage}_seconds" for stage in STAGES),
    "notes",
)


class Result(Protocol):
    """The fields of runner.JobResult a report reads."""

    job: object
    status: str
    error: str
    reason: str
    seconds: float
    input_size: tuple[int, int] | None
    output_size: tuple[int, int] | None
    input_mode: str
    timings: dict[str, float]
    notes: list[str]
    batch: int


def _bytes(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def image_row(result: Result) -> dict[str, object]:
    """One image's line of the report (flat: the CSV's columns)."""
    source, output = result.job.source, result.job.output  # type: ignore[attr-defined]
    input_size = result.input_size or (None, None)
    output_size = result.output_size or (None, None)
    row: dict[str, object] = {
        "input": str(source),
        "output": str(output),
        "status": result.status,
        "error": result.error,
        "reason": result.reason,
        "input_mode": result.input_mode,
        "input_width": input_size[0],
        "input_height": input_size[1],
        "input_bytes": _bytes(source),
        "output_width": output_size[0],
        "output_height": output_size[1],
        "output_bytes": _bytes(output) if result.status == "done" else None,
        "seconds": round(result.seconds, 4),
        "batch": result.batch,
    }
    for stage in STAGES:
        seconds = result.timings.get(stage)
        row[f"{stage}_seconds"] = None if seconds is None else round(seconds, 4)
    row["notes"] = "; ".join(result.notes)
    return row


class JsonReport:
    """{"summary": ..., "settings": ..., "images": [...]}."""

    @staticmethod
    def render(rows: list[dict], summary: dict, settings: dict) -> str:
        payload = {"summary": summary, "settings": settings, "images": rows}
        return json.dumps(payload, indent=2, default=str) + "\n"


class CsvReport:
    """One row per image, the columns of COLUMNS (empty cells for missing values). A text
    cell that a spreadsheet would run as a formula starts with ``'`` (``imaging.names``)."""

    @staticmethod
    def render(rows: list[dict], summary: dict, settings: dict) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else csv_cell(v) for k, v in row.items()})
        return buffer.getvalue()


WRITERS = {".json": JsonReport, ".csv": CsvReport}


def check_report_path(path: Path) -> None:
    """Refuse an extension we cannot write before any work is done."""
    if path.suffix.lower() not in WRITERS:
        raise OptionsError(f"--report {path}: the name must end in .json or .csv")


def write_report(path: Path, results: Iterable[Result], summary: dict, settings: dict) -> None:
    """Write the report atomically (raises OSError when it cannot be written)."""
    check_report_path(path)
    family = (settings.get("model") or {}).get("family", "")
    rows = [{**image_row(result), "family": family} for result in results]
    text = WRITERS[path.suffix.lower()].render(rows, summary, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
