"""`pisa bench`: measure this machine on the real SD 2.1-base architecture (random weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pisa_cli.cli import common
from pisa_cli.options import ModelOptions

DEFAULTS = ModelOptions()
"""The defaults of the model options this command shares with upscale (declared there)."""

DEFAULT_SCENARIOS = (
    "default-128",
    "adjustable-128",
    "upscale-512-2048",
    "folder-8",
    "cold-start",
    "precision",
)
"""What `pisa bench` runs without arguments; the other scenarios run by name."""


def bench_command(
    scenarios: Annotated[
        list[str] | None,
        typer.Argument(
            help=f"Scenarios to run (default: {', '.join(DEFAULT_SCENARIOS)}; the longer ones "
            "by name). See --list.",
            show_default=False,
        ),
    ] = None,
    device: common.Device = DEFAULTS.device,
    dtype: common.Dtype = DEFAULTS.dtype,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")
    ] = None,
    list_only: Annotated[bool, typer.Option("--list", help="List the scenarios and exit.")] = False,
    official: Annotated[
        Path | None,
        typer.Option(
            "--official",
            help="bench gpu: a checkout of the official PiSA-SR code (csslc/PiSA-SR) to time "
            "side by side; skipped without.",
        ),
    ] = None,
) -> None:
    """Benchmark scenarios on the full-size SD 2.1-base architecture with random weights.

    Nothing is downloaded: the architecture comes from configs shipped with pisa-cli. Prints
    a table of wall time, peak memory and per-scenario figures.
    """
    common.setup_logging()
    import pisa_cli.bench.coldstart
    import pisa_cli.bench.gpu
    import pisa_cli.bench.perf
    import pisa_cli.bench.scaleout
    import pisa_cli.bench.streaming
    import pisa_cli.bench.sweep
    import pisa_cli.bench.upscale
    import pisa_cli.bench.vae  # noqa: F401 - registers the scenarios
    from pisa_cli.bench import SCENARIOS, format_table, write_json
    from pisa_cli.errors import PisaError
    from pisa_cli.models.device import resolve_device, resolve_dtype

    if list_only:
        import shutil
        import textwrap

        from pisa_cli.cli.helptext import first_sentence

        width = max(60, shutil.get_terminal_size().columns)
        for name, function in SCENARIOS.items():
            text = f"{name:<20} {first_sentence(function.__doc__)}"
            typer.echo(textwrap.fill(text, width, subsequent_indent=" " * 21))
        return
    chosen = scenarios or [name for name in DEFAULT_SCENARIOS if name in SCENARIOS]
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown:
        typer.echo(f"error: unknown scenario {unknown[0]!r}; see pisa bench --list", err=True)
        raise typer.Exit(2)
    if "gpu" in chosen:
        if len(chosen) > 1:
            typer.echo("error: the gpu scenario runs alone: pisa bench gpu", err=True)
            raise typer.Exit(2)
        raise typer.Exit(_gpu(json_path, official))
    try:
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
    except PisaError as error:
        raise common.fail(error) from None
    rows = []
    for name in chosen:
        typer.echo(f"running {name} ...", err=True)
        rows += SCENARIOS[name](torch_device, torch_dtype)
        typer.echo(format_table(rows))
    if json_path is not None:
        write_json(rows, json_path)
        typer.echo(f"wrote {json_path}")


def _gpu(json_path: Path | None, official: Path | None) -> int:
    """`pisa bench gpu`: exit 2 without CUDA, 1 when a check fails, else 0."""
    import json

    import torch

    from pisa_cli.bench import format_table
    from pisa_cli.bench.gpu import NO_CUDA, prove

    if not torch.cuda.is_available():
        typer.echo(NO_CUDA, err=True)
        return 2
    report = prove(
        torch.device("cuda"), official, lambda step: typer.echo(f"running {step} ...", err=True)
    )
    for check in report.checks:
        typer.echo(f"{check.word:<5} {check.name}: {check.detail}")
    typer.echo(format_table(report.rows))
    if json_path is not None:
        json_path.write_text(json.dumps(report.as_json(), indent=2, default=str))
        typer.echo(f"wrote {json_path}")
    return 1 if report.failed else 0
