"""`pisa doctor`: is this install working, and what is still missing?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pisa_cli.cli import common
from pisa_cli.options import ModelOptions

DEFAULTS = ModelOptions()
"""The defaults of the model options this command shares with upscale (declared there)."""

DemoFolder = Annotated[
    Path | None,
    typer.Option(
        "--demo",
        help="Instead of the checks: leave a tiny random model, its weights and a few sample "
        "images in this new folder, and print the `pisa upscale` and `pisa sweep` lines that "
        "run on them (no download; the outputs are noise-like: random weights).",
        show_default=False,
    ),
]


def doctor_command(
    base_model: common.BaseModel = DEFAULTS.base_model,
    weights: common.Weights = DEFAULTS.weights,
    device: common.Device = DEFAULTS.device,
    dtype: common.Dtype = DEFAULTS.dtype,
    demo: DemoFolder = None,
) -> None:
    """Check the install and run the pipeline once on a tiny random model.

    Prints the devices, precision, free memory, where the base model and weights are, and
    the result of one real run on a tiny random model on the chosen device. With --demo
    DIR, leaves a tiny model and sample images in DIR and prints the commands to try.

    Exits 0 when the install works, even if the weights are not downloaded yet (it says how
    to get them); 1 only when something is broken.
    """
    common.setup_logging(quiet=True)
    if demo is not None:
        _demo(demo)
        return
    from pisa_cli.core.doctor import BROKEN, run_checks
    from pisa_cli.errors import PisaError
    from pisa_cli.options import ModelOptions

    try:
        model = ModelOptions(base_model=base_model, weights=weights, device=device, dtype=dtype)
    except PisaError as error:
        raise common.fail(error) from None
    checks = run_checks(model)
    width = max(len(check.name) for check in checks)
    for check in checks:
        common.say(f"{check.status:>7}  {check.name:<{width}}  {check.detail}")
    broken = [check for check in checks if check.status == BROKEN]
    if broken:
        common.say(f"the install is broken: {broken[0].name}: {broken[0].detail}", err=True)
        raise typer.Exit(1)
    common.say("the install works")


def _demo(folder: Path) -> None:
    """Write the demo folder and print the lines to run on it."""
    from pisa_cli.core.demo import write_demo
    from pisa_cli.errors import PisaError

    try:
        made = write_demo(folder)
    except PisaError as error:
        raise common.fail(error) from None
    except OSError as error:
        common.say(f"error: {folder}: cannot write the demo ({error.strerror or error})", err=True)
        raise typer.Exit(1) from None
    common.say(f"a tiny random model, its weights and {len(made.files) - 2} images are in {folder}")
    common.say("try (the outputs look like noise: the model's weights are random):")
    for command in made.commands:
        common.say(f"  {command}")
