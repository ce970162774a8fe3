"""`pisa convert`: the official pisa_sr.pkl to our safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pisa_cli.cli import common
from pisa_cli.errors import PisaError


def convert_command(
    source: Annotated[Path, typer.Argument(help="The official pisa_sr.pkl (or a .safetensors).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the .safetensors file.")
    ],
) -> None:
    """Convert PiSA-SR weights to safetensors: `pisa convert pisa_sr.pkl -o pisa_sr.safetensors`.

    The pickle is read safely (tensors and plain containers only). The safetensors file holds
    the six LoRAs bit for bit, with ranks, alpha and module lists as metadata; it loads
    faster and can never run code.
    """
    common.setup_logging()
    if output.suffix != ".safetensors":
        common.say(f"error: {output}: the output name must end in .safetensors", err=True)
        raise typer.Exit(2)
    from pisa_cli.models.checkpoint import load_checkpoint, save_safetensors

    try:
        checkpoint = load_checkpoint(source)
        output.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(checkpoint, output)
        again = load_checkpoint(output)
    except PisaError as error:
        raise common.fail(error) from None
    except OSError as error:
        common.say(f"error: {output}: cannot write ({error.strerror or error})", err=True)
        raise typer.Exit(1) from None
    same = again.tensors.keys() == checkpoint.tensors.keys() and all(
        again.tensors[k].dtype == t.dtype and again.tensors[k].equal(t)
        for k, t in checkpoint.tensors.items()
    )
    if not same:  # pragma: no cover - would be a bug in safetensors or in our writer
        output.unlink(missing_ok=True)
        common.say(f"error: {output}: the written tensors differ from the source", err=True)
        raise typer.Exit(1)
    count = sum(len(m) for m in checkpoint.modules.values())
    common.say(f"wrote {output}: {count} LoRA layers, ranks {dict(checkpoint.ranks)}, verified")
