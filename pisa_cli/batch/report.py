"""``--report``: what happened to each image, as JSON or CSV (picked by the extension).

Each image: input, output, status, error, why it ran or was skipped, the model family that
ran (its name in ``core.families``, from the run's settings), input mode, input and output
sizes (pixels and bytes), seconds per stage (a stage shared by a batch of images counts a
share for each), the images in its model calls (``batch``), notes. JSON adds the run's summary and
settings. The file is written atomically at the end of the run, Ctrl-C included; where it
goes is checked before the run (``check_report_path``). Names and messages are escaped as
the display shows them (``imaging.names.shown``): a name that is not UTF-8 or holds control
characters cannot break the file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pisa_cli.errors import OptionsError
from pisa_cli.fsutil import atomic_path, kind_of, probe_writable
from pisa_cli.imaging.names import csv_cell, shown

if TYPE_CHECKING:
    from pisa_cli.batch.runner import JobResult  # what a report is made of

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


def _bytes(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def image_row(result: JobResult) -> dict[str, object]:
    """One image's line of the report (flat: the CSV's columns)."""
    source, output = result.job.source, result.job.output  # type: ignore[attr-defined]
    input_size = result.input_size or (None, None)
    output_size = result.output_size or (None, None)
    row: dict[str, object] = {
        "input": shown(source),
        "output": shown(output),
        "status": result.status,
        "error": shown(result.error),
        "reason": shown(result.reason),
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
    row["notes"] = shown("; ".join(result.notes))
    return row


def _escaped(value: object) -> object:
    """``value`` with every string in it escaped as displayed (the settings hold paths)."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {shown(key): _escaped(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(item) for item in value]
    return value


class JsonReport:
    """{"summary": ..., "settings": ..., "images": [...]}."""

    @staticmethod
    def render(rows: list[dict], summary: dict, settings: dict) -> str:
        payload = {"summary": summary, "settings": _escaped(settings), "images": rows}
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
    """Refuse, before any work is done, a report that could not be written at the end: an
    extension we cannot write, a name taken by a folder (or a device, a FIFO), a folder that
    is a file or cannot be written (raises OptionsError)."""
    _check_extension(path)
    kind = kind_of(path, follow=True)
    if kind not in (None, "a file", "a link to nothing"):  # a link is replaced, not followed
        raise OptionsError(f"--report {path}: {kind} has that name; give the report a file name")
    folder = path.parent
    while kind_of(folder, follow=True) is None and folder != folder.parent:
        folder = folder.parent  # created at the end: its nearest existing folder must allow it
    kind = kind_of(folder, follow=True)
    if kind != "a folder":
        raise OptionsError(f"--report {path}: {folder} is {kind}, not a folder")
    try:
        if folder == path.parent:
            probe_writable(folder)
        elif not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as error:
        reason = error.strerror or error
        raise OptionsError(f"--report {path}: cannot write in {folder} ({reason})") from None


def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in WRITERS:
        raise OptionsError(f"--report {path}: the name must end in .json or .csv")


def write_report(path: Path, results: Iterable[JobResult], summary: dict, settings: dict) -> None:
    """Write the report atomically (raises OSError when it cannot be written, which
    ``check_report_path`` made unlikely before the run)."""
    _check_extension(path)
    family = (settings.get("model") or {}).get("family", "")
    rows = [{**image_row(result), "family": family} for result in results]
    text = WRITERS[path.suffix.lower()].render(rows, summary, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")


COUNTED = ("done", "skipped", "failed", "not_done")


def merge_reports(parts: list[Path], path: Path) -> dict:
    """One report at ``path`` from the JSON report parts of a sharded run (``--shard K/N``:
    ``report.shardKofN.json``): the images of all, the counts added up, the slowest share's
    seconds. Returns the merged summary. Raises OptionsError naming a part that is not a
    JSON report of pisa, or whose settings differ from the first part's."""
    rows: list[dict] = []
    summary: dict = dict.fromkeys(COUNTED, 0) | {"interrupted": False, "seconds": 0.0}
    settings: dict | None = None
    shards = []
    for part in parts:
        try:
            payload = json.loads(part.read_text(encoding="utf-8"))
            own, images = payload["summary"], payload["images"]
            counts = {name: int(own[name]) for name in COUNTED}
        except (OSError, ValueError, KeyError, TypeError) as error:
            why = getattr(error, "strerror", None) or f"not a JSON report of pisa ({error!r})"
            raise OptionsError(f"{part}: {why}") from None
        if settings is None:
            settings = payload.get("settings", {})
        elif payload.get("settings", {}) != settings:
            raise OptionsError(f"{part}: made with other settings than {parts[0]}")
        for name, count in counts.items():
            summary[name] += count
        summary["interrupted"] = summary["interrupted"] or bool(own.get("interrupted"))
        summary["seconds"] = max(summary["seconds"], float(own.get("seconds", 0.0)))
        shards.append(own.get("shard", ""))
        rows += images
    summary["shards"] = shards
    _check_extension(path)
    text = WRITERS[path.suffix.lower()].render(rows, summary, settings or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return summary
