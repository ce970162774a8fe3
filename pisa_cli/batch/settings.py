"""What an output's pixels depend on, as the manifest records it (resume decides on it)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pisa_cli.errors import WeightsError
from pisa_cli.options import BatchOptions, ModelOptions, UpscaleOptions

PIXELS_VERSION = 1
"""Bumped when the way outputs are made changes (a new release redoes older outputs)."""


def run_settings(options: UpscaleOptions, batch: BatchOptions, model: dict) -> dict:
    """Everything an output's pixels depend on, as recorded in the manifest: the upscale
    options, the model (weights, base model, precision), the quality of lossy formats. The
    format and suffix are in the output's name already."""
    settings = {"upscale": asdict(options), "model": model, "pixels": PIXELS_VERSION}
    if batch.format in ("jpg", "webp", "same"):
        settings["quality"] = batch.quality
    return settings


def model_identity(model: ModelOptions, options: UpscaleOptions) -> dict:
    """The model part of the settings: the weights' SHA-256, the base model, the precision,
    the second pass's LoRA files. Raises WeightsError when the weights cannot be found."""
    from pisa_cli.fsutil import file_sha256
    from pisa_cli.models.checkpoint import load_checkpoint, resolve_weights_path
    from pisa_cli.models.device import resolve_device, resolve_dtype

    weights = resolve_weights_path(model.resolved_weights())
    if not weights.is_file():
        load_checkpoint(weights)  # raises its "not found" error with the download hint
    try:
        digest = file_sha256(weights)
    except OSError as error:
        raise WeightsError(f"{weights}: cannot read ({error.strerror or error})") from None
    dtype = resolve_dtype(model.dtype, resolve_device(model.device))
    base = model.resolved_base_model()
    identity = {
        "weights_sha256": digest,
        "base_model": str(Path(base).resolve()) if Path(base).exists() else base,
        "dtype": str(dtype).removeprefix("torch."),
    }
    second = Path(options.second_pass.weights)
    if options.second_pass.kind == "tudsr" and second.exists():
        files = sorted(second.glob("*")) if second.is_dir() else [second]
        identity["second_pass_sha256"] = [file_sha256(f) for f in files if f.is_file()]
    return identity
