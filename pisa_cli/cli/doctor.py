"""`pisa doctor`: is this install working, and what is still missing?"""

from __future__ import annotations

import typer

from pisa_cli.cli import common


def doctor_command(
    base_model: common.BaseModel = "",
    weights: common.Weights = "",
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
) -> None:
    """Check the install and run the pipeline once on a tiny random model.

    Prints the devices, precision, free memory, where the base model and weights are, and
    the result of one real run on a tiny random model on the chosen device.

    Exits 0 when the install works, even if the weights are not downloaded yet (it says how
    to get them); 1 only when something is broken.
    """
    common.setup_logging(quiet=True)
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
