"""Which model family runs each pass, told from the weights before anything is loaded
(``core.families``): the model identity the manifest and the report record, and the dry
run's lines."""

from __future__ import annotations

from pathlib import Path

from pisa_cli.errors import WeightsError
from pisa_cli.options import ModelOptions, UpscaleOptions


def model_identity(model: ModelOptions, options: UpscaleOptions) -> dict:
    """What the outputs' pixels depend on besides the options: the family, digests of the
    weights' files, the base model, the precision and what the family adds (the timestep
    that runs). Raises WeightsError when the weights cannot be found or read."""
    from pisa_cli.core.families import family_of
    from pisa_cli.models.checkpoint import resolve_weights_path
    from pisa_cli.models.device import resolve_device, resolve_dtype

    weights = resolve_weights_path(model.resolved_weights())
    family = family_of(weights)
    family.check_present(weights)
    digests = _digests(family.weight_files(weights))
    dtype = resolve_dtype(model.dtype, resolve_device(model.device))
    base = model.resolved_base_model()
    identity: dict = {
        "family": family.name,
        "weights_sha256": digests[0] if weights.is_file() else digests,
        "base_model": str(Path(base).resolve()) if Path(base).exists() else base,
        "dtype": str(dtype).removeprefix("torch."),
    }
    identity |= family.identity(weights, options, "first")
    second = Path(options.second_pass.weights).expanduser()
    if options.second_pass.kind == "tudsr" and second.exists():
        second_family = family_of(second, "second")
        identity["second_pass_sha256"] = _digests(second_family.weight_files(second))
        identity |= second_family.identity(second, options, "second")
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
    from pisa_cli.core.families import family_of

    weights = model.resolved_weights()
    lines = [family_of(weights).describe_planned(weights, options, "first")]
    second = options.second_pass
    if second.kind == "tudsr":
        family = family_of(second.weights, "second")
        lines.append(family.describe_planned(second.weights, options, "second"))
    elif second.kind != "none":
        lines.append(f"second pass: {second.kind} {second.weights}".rstrip())
    return lines
