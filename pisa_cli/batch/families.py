"""Which model family runs each pass, told from the weights' names before anything is
loaded: the model identity the manifest and the report record, and the dry run's lines.

Families: PiSA-SR (``pisa_sr.pkl`` or our safetensors; t = 1, lambdas) and OMGSR-style
adapter folders (UNet + VAE-encoder LoRA at a mid timestep, models/adapters.py), as the
first pass or as the x2 second pass.
"""

from __future__ import annotations

from pathlib import Path

from pisa_cli.errors import WeightsError
from pisa_cli.options import ModelOptions, UpscaleOptions

HYPIR_TIMESTEP = 200
"""HYPIR-SD2's model_t and coeff_t (as ``core.passes``)."""


def model_identity(model: ModelOptions, options: UpscaleOptions) -> dict:
    """What the outputs' pixels depend on besides the options: the family, digests of the
    weights' files, the base model, the precision and, for OMGSR-style folders, the
    timestep that runs. Raises WeightsError when the weights cannot be found or read."""
    from pisa_cli.models.adapters import HYPIR, OMGSR, family_of, planned_timestep, weight_files
    from pisa_cli.models.checkpoint import load_checkpoint, resolve_weights_path
    from pisa_cli.models.device import resolve_device, resolve_dtype

    weights = resolve_weights_path(model.resolved_weights())
    family = family_of(weights)
    if family != OMGSR and not weights.is_file():
        load_checkpoint(weights)  # raises its "not found" error with the download hint
    digests = _digests(weight_files(weights))
    dtype = resolve_dtype(model.dtype, resolve_device(model.device))
    base = model.resolved_base_model()
    identity: dict = {
        "family": family,
        "weights_sha256": digests[0] if weights.is_file() else digests,
        "base_model": str(Path(base).resolve()) if Path(base).exists() else base,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if family == OMGSR:
        identity["timestep"] = planned_timestep(weights, options.timestep)[0]
    elif family == HYPIR:
        identity["timestep"] = HYPIR_TIMESTEP if options.timestep is None else options.timestep
    second = Path(options.second_pass.weights)
    if options.second_pass.kind == "tudsr" and second.exists():
        identity["second_pass_sha256"] = _digests(weight_files(second))
        if second.is_dir() and family_of(second) != OMGSR:  # a peft folder: refused now,
            from pisa_cli.models.second_lora import peek_timestep  # not once -o is made

            peek_timestep(second)
        if family_of(second) == OMGSR:
            flag, what = options.second_pass.timestep, "--second-pass-timestep"
            identity["second_pass_family"] = OMGSR
            identity["second_pass_timestep"] = planned_timestep(second, flag, what)[0]
    return identity


def _digests(files: list[Path]) -> list[str]:
    from pisa_cli.fsutil import file_sha256

    try:
        return [file_sha256(f) for f in files]
    except OSError as error:
        name = error.filename or files[0]
        raise WeightsError(f"{name}: cannot read ({error.strerror or error})") from None


def describe_families(options: UpscaleOptions, model: ModelOptions) -> list[str]:
    """Which model family each pass runs, for --dry-run (names and headers only)."""
    from pisa_cli.models.adapters import (
        FAMILY_NAMES,
        HYPIR,
        OMGSR,
        PISA,
        family_of,
        planned_timestep,
    )

    weights = model.resolved_weights()
    if family_of(weights) == HYPIR:
        timestep = HYPIR_TIMESTEP if options.timestep is None else options.timestep
        lines = [
            f"model: {FAMILY_NAMES[HYPIR]} {weights}, model_t = coeff_t = {timestep} "
            "(weights for non-commercial use only)"
        ]
    elif family_of(weights) == OMGSR:
        timestep, origin = planned_timestep(weights, options.timestep)
        lines = [f"model: {FAMILY_NAMES[OMGSR]} {weights}, timestep {timestep} ({origin})"]
    else:
        lines = [f"model: {FAMILY_NAMES[PISA]} {weights or '(default weights)'}, timestep 1"]
    second = options.second_pass
    if second.kind == "tudsr" and family_of(second.weights) == OMGSR:
        what = "--second-pass-timestep"
        timestep, origin = planned_timestep(second.weights, second.timestep, what)
        lines.append(
            f"second pass: {FAMILY_NAMES[OMGSR]} {second.weights}, timestep {timestep} ({origin})"
        )
    elif second.kind != "none":
        lines.append(f"second pass: {second.kind} {second.weights}".rstrip())
    return lines
