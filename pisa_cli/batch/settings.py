"""What an output's pixels depend on, as the manifest records it (resume decides on it)."""

from __future__ import annotations

from dataclasses import asdict

from pisa_cli.options import BatchOptions, UpscaleOptions

PIXELS_VERSION = 1
"""Bumped when the way outputs are made changes (a new release redoes older outputs)."""


def run_settings(options: UpscaleOptions, batch: BatchOptions, model: dict) -> dict:
    """Everything an output's pixels depend on, as recorded in the manifest: the upscale
    options, the model (weights, base model, precision), the quality of lossy formats. The
    format and suffix are in the output's name already."""
    settings = {"upscale": asdict(options), "model": model, "pixels": PIXELS_VERSION}
    if batch.write.format in ("jpg", "webp", "same"):
        settings["quality"] = batch.write.quality
    return settings
