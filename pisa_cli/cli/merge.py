"""`pisa merge-reports`: the report parts of a sharded run (--shard, or the ranks of
torchrun / srun) made one report, with one summary line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from pisa_cli.cli import common
from pisa_cli.cli.progress import summary
from pisa_cli.errors import PisaError


def merge_command(
    parts: Annotated[
        list[Path], typer.Argument(help="The JSON report parts (report.shardKofN.json ...).")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The merged report (.json or .csv).")
    ],
) -> None:
    """Merge the --report parts of a sharded run into one report: `pisa merge-reports
    report.shard*.json -o report.json`. Exit code 1 when an image failed in any part."""
    from pisa_cli.batch.report import merge_reports

    try:
        merged = merge_reports(parts, output)
    except PisaError as error:
        raise common.fail(error) from None
    counts = Counter({name: merged[name] for name in ("done", "skipped", "failed")})
    common.say(f"{summary(counts)} in {len(parts)} parts", err=True)
    if merged["failed"]:
        raise typer.Exit(1)
