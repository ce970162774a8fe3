"""The ``pisa`` command: one module per sub-command, registered here.

Nothing heavy is imported at this level: ``pisa --help`` must not load torch.
"""

from __future__ import annotations

import typer

from pisa_cli import __version__
from pisa_cli.cli.bench import bench_command
from pisa_cli.cli.convert import convert_command
from pisa_cli.cli.doctor import doctor_command
from pisa_cli.cli.helptext import Command, Group
from pisa_cli.cli.merge import merge_command
from pisa_cli.cli.sweep import sweep_command
from pisa_cli.cli.upscale import upscale_command

app = typer.Typer(
    name="pisa",
    cls=Group,
    help="Batch image upscaling with PiSA-SR: one-step diffusion super-resolution with "
    "adjustable fidelity (--lambda-pix) and detail (--lambda-sem).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pisa-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Batch image upscaling with PiSA-SR."""


for name, function in (
    ("upscale", upscale_command),
    ("sweep", sweep_command),
    ("convert", convert_command),
    ("doctor", doctor_command),
    ("bench", bench_command),
    ("merge-reports", merge_command),
):
    app.command(name, cls=Command)(function)


def main() -> None:
    app()
