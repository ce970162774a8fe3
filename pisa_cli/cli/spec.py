"""The options of the commands that run the model, declared once, and the typed spec a
command's values become.

``pisa upscale`` and ``pisa sweep`` take the same model, quality, tile and second-pass
options: each group is a list of parameters (the declarations in ``common``) that a
command's signature is built from (``takes``), so no option is written twice. An option
that is an options field takes its default from the field (``declared``) and its help
from the field's metadata (``options.described``): the CLI cannot drift from the API.
A command is called with its values as keyword arguments and turns them into a spec once,
reading each value by name (``model_options`` ...): no dict is popped in a hidden order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import typer

from pisa_cli.batch.shard import Shard
from pisa_cli.cli import common
from pisa_cli.imaging.objects import ObjectPath
from pisa_cli.options import (
    DEFAULT_MAX_PIXELS,
    BatchOptions,
    ModelOptions,
    SecondPassOptions,
    TileOptions,
    UpscaleOptions,
    WriteOptions,
    parse_tile,
)


def option(name: str, annotation: object, default: object = inspect.Parameter.empty):
    """A keyword parameter of a command: its name, its typer declaration, its default."""
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def default_of(options: type, name: str) -> object:
    """The command-line default of ``options``'s field ``name``: the field's own (``auto``
    for a size left to the run, None in the options)."""
    declared = next(item for item in fields(options) if item.name == name)
    value = declared.default
    return "auto" if value is None and declared.metadata.get("auto") else value


def declared(name: str, annotation: object, options: type, field_name: str = ""):
    """A keyword parameter for the option that ``options``'s field (``field_name``, else
    ``name``) is: its default taken from the field, so it is written once, in ``options``."""
    return option(name, annotation, default_of(options, field_name or name))


CONTEXT = [option("context", typer.Context)]
INPUTS = [option("inputs", common.Inputs), option("output", common.OutputDir)]
MODEL = [
    declared("base_model", common.BaseModel, ModelOptions),
    declared("weights", common.Weights, ModelOptions),
]
SCALE = [
    declared("scale", common.Scale, UpscaleOptions),
    declared("process_size", common.ProcessSize, UpscaleOptions),
]
LAMBDAS = [
    declared("lambda_pix", common.LambdaPix, UpscaleOptions),
    declared("lambda_sem", common.LambdaSem, UpscaleOptions),
]
LOOK = [
    option("color_fix", common.ColorFix, None),  # the weights' family's: default_color_fix
    declared("prompt", common.Prompt, UpscaleOptions),
    declared("seed", common.Seed, UpscaleOptions),
    declared("vae_sample", common.VaeSample, UpscaleOptions),
]
TIMESTEP = [declared("timestep", common.Timestep, UpscaleOptions)]
"""A first pass's timestep, for the families that take one (the sweep runs PiSA-SR only)."""
TILES = [
    declared("latent_tile", common.LatentTile, TileOptions),
    declared("latent_overlap", common.LatentOverlap, TileOptions),
    declared("vae_encoder_tile", common.VaeEncoderTile, TileOptions),
    declared("vae_decoder_tile", common.VaeDecoderTile, TileOptions),
    declared("tile_batch", common.TileBatch, TileOptions),
    declared("image_batch", common.ImageBatch, BatchOptions),
]
SECOND = [
    declared("second_pass", common.SecondPass, SecondPassOptions, "kind"),
    declared("second_pass_weights", common.SecondPassWeights, SecondPassOptions, "weights"),
    declared("second_pass_timestep", common.SecondPassTimestep, SecondPassOptions, "timestep"),
    declared("second_pass_prompt", common.SecondPassPrompt, SecondPassOptions, "prompt"),
]
DEVICE = [
    declared("device", common.Device, ModelOptions),
    declared("dtype", common.Dtype, ModelOptions),
    declared("compile", common.Compile, ModelOptions),
]
MAX_PIXELS = [declared("max_pixels", common.MaxPixels, BatchOptions)]
OUTPUTS = [
    declared("recursive", common.Recursive, BatchOptions),
    *MAX_PIXELS,
    declared("format", common.Format, WriteOptions),
    declared("quality", common.Quality, WriteOptions),
    declared("suffix", common.Suffix, WriteOptions),
    declared("overwrite", common.Overwrite, BatchOptions),
    option("report", common.Report, None),
]
RANKS = [
    option("devices", common.Devices, ""),
    option("shard", common.Shard, ""),
    option("ray", common.Ray, ""),
]
RUN = [
    option("dry_run", common.DryRun, False),
    option("quiet", common.Quiet, False),
    option("verbose", common.Verbose, False),
]


def takes(*groups: list[inspect.Parameter]) -> Callable[[Callable], Callable]:
    """Give a command ``def command(**values)`` the parameters of ``groups`` (typer reads a
    command's options from its signature)."""
    parameters = [parameter for group in groups for parameter in group]

    def decorate(function: Callable) -> Callable:
        function.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        return function

    return decorate


def model_options(values: Mapping[str, Any]) -> ModelOptions:
    """Where the models come from and where they run (raises OptionsError)."""
    return ModelOptions(
        base_model=values["base_model"],
        weights=values["weights"],
        device=values["device"],
        dtype=values["dtype"],
        compile=values["compile"],
    )


OPTIONAL = ("lambda_pix", "lambda_sem", "timestep")
"""UpscaleOptions fields that not every command takes."""


def upscale_options(values: Mapping[str, Any]) -> UpscaleOptions:
    """What is done to each image (raises OptionsError); the lambdas default to the paper's
    when the command has none (the sweep's come from its grid)."""
    tiles = TileOptions(
        latent_tile=parse_tile("--latent-tile", values["latent_tile"]),
        latent_overlap=parse_tile("--latent-overlap", values["latent_overlap"]),
        vae_encoder_tile=parse_tile("--vae-encoder-tile", values["vae_encoder_tile"]),
        vae_decoder_tile=parse_tile("--vae-decoder-tile", values["vae_decoder_tile"]),
        tile_batch=parse_tile("--tile-batch", values["tile_batch"]),
    )
    second = SecondPassOptions(
        kind=values["second_pass"],
        weights=values["second_pass_weights"],
        timestep=values["second_pass_timestep"],
        prompt=values["second_pass_prompt"],
    )
    # options a command may not have (the sweep's lambdas, its timestep) keep their default
    optional = {name: values[name] for name in OPTIONAL if name in values}
    return UpscaleOptions(
        scale=values["scale"],
        process_size=values["process_size"],
        color_fix=values["color_fix"] or default_color_fix(values["weights"]),
        prompt=values["prompt"],
        seed=values["seed"],
        vae_sample=values["vae_sample"],
        tiles=tiles,
        second_pass=second,
        **optional,
    )


def default_color_fix(weights: str) -> str:
    """The colour fix of the weights' family when --color-fix is not given (each family
    says its own, ``core.families``)."""
    import os

    from pisa_cli.core.families import family_of
    from pisa_cli.options import WEIGHTS_ENV

    return family_of(weights or os.environ.get(WEIGHTS_ENV, "")).color_fix


def batch_options(values: Mapping[str, Any]) -> BatchOptions:
    """How the batch finds inputs and writes outputs (raises OptionsError)."""
    write = WriteOptions(
        format=values["format"], quality=values["quality"], suffix=values["suffix"]
    )
    return BatchOptions(
        write=write,
        recursive=values["recursive"],
        overwrite=values["overwrite"],
        max_pixels=values["max_pixels"],
        image_batch=parse_tile("--image-batch", values["image_batch"]),
    )


@dataclass(frozen=True)
class UpscaleSpec:
    """Everything ``pisa upscale`` was asked to do, checked."""

    inputs: tuple[Path | ObjectPath, ...]
    output: Path | ObjectPath
    """A local folder, or a prefix on object storage."""
    model: ModelOptions
    options: UpscaleOptions
    batch: BatchOptions
    report: Path | None = None
    devices: str = ""
    shard: Shard = field(default_factory=Shard)
    ray: str = ""
    """Where to run on Ray: local (this machine), auto, or a cluster's address; "" for no Ray."""
    dry_run: bool = False
    quiet: bool = False
    verbose: bool = False

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> UpscaleSpec:
        """The spec of ``pisa upscale``'s values (raises OptionsError)."""
        from pisa_cli.imaging.objects import StorageError, is_url, location

        report = values["report"]
        if is_url(report):
            raise StorageError(f"--report {report}: reports are written to local files only")
        if report is not None:
            from pisa_cli.batch.report import check_report_path

            report = Path(report)
            check_report_path(report)
        return cls(
            inputs=tuple(location(item) for item in values["inputs"]),
            output=location(values["output"]),
            model=model_options(values),
            options=upscale_options(values),
            batch=batch_options(values),
            report=report,
            devices=values["devices"],
            shard=Shard.parse(values["shard"]) if values["shard"] else Shard(),
            ray=values["ray"],
            dry_run=values["dry_run"],
            quiet=values["quiet"],
            verbose=values["verbose"],
        )


@dataclass(frozen=True)
class SweepSpec:
    """Everything ``pisa sweep`` was asked to do, checked (its own options in ``sweep``)."""

    inputs: tuple[Path, ...]
    output: Path
    model: ModelOptions
    options: UpscaleOptions
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_batch: int | None = None
    """--image-batch: grid points per decoder call (None: auto)."""
    sweep: dict = field(default_factory=dict)
    """The sweep's own values (grid, images, viewer, metrics, sheet), checked by the sweep."""
    dry_run: bool = False
    quiet: bool = False
    verbose: bool = False

    @classmethod
    def parse(cls, values: Mapping[str, Any], own: tuple[str, ...]) -> SweepSpec:
        """The spec of ``pisa sweep``'s values; ``own`` names the sweep's own options."""
        from pisa_cli.imaging.objects import StorageError, is_url

        for url in [*values["inputs"], values["output"]]:
            if is_url(url):
                raise StorageError(f"{url}: pisa sweep reads and writes local files only")
        return cls(
            inputs=tuple(map(Path, values["inputs"])),
            output=Path(values["output"]),
            model=model_options(values),
            options=upscale_options(values),
            max_pixels=values["max_pixels"],
            image_batch=_image_batch(values["image_batch"]),
            sweep={name: values[name] for name in own},
            dry_run=values["dry_run"],
            quiet=values["quiet"],
            verbose=values["verbose"],
        )


def _image_batch(value: str) -> int | None:
    """--image-batch: auto (None) or at least 1 (raises OptionsError)."""
    return BatchOptions(image_batch=parse_tile("--image-batch", value)).image_batch
