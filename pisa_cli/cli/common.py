"""Options shared by the commands that run the model (upscale, sweep), and console set-up.

Only typer, rich and the options module are imported here, so ``pisa --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from pisa_cli.errors import PisaError
from pisa_cli.imaging.names import shown
from pisa_cli.options import (
    BASE_MODEL_ENV,
    WEIGHTS_ENV,
    BatchOptions,
    ModelOptions,
    SecondPassOptions,
    TileOptions,
    UpscaleOptions,
    WriteOptions,
    help_of,
)

MODEL = "Model"
QUALITY = "Lambdas and quality"
TILES = "Tiles and memory"
OUTPUT = "Output"
INPUT = "Input"

Inputs = Annotated[
    list[str],  # str, not Path: Path would fold the // of s3://bucket/in
    typer.Argument(
        help="Image files, folders of images, and/or glob patterns ('shots/**/*.jpg'); "
        "objects, prefixes or patterns on object storage (s3://bucket/in, gs://...).",
        show_default=False,
    ),
]
OutputDir = Annotated[
    str, typer.Option("--output", "-o", metavar="<path>", help="Folder or s3://... for results.")
]
BaseModel = Annotated[
    str,
    typer.Option(
        "--base-model",
        envvar=BASE_MODEL_ENV,
        help=help_of(ModelOptions, "base_model"),
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Weights = Annotated[
    str,
    typer.Option(
        "--weights",
        envvar=WEIGHTS_ENV,
        help=help_of(ModelOptions, "weights"),
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device",
        help=help_of(ModelOptions, "device"),
        rich_help_panel=MODEL,
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help=help_of(ModelOptions, "dtype"),
        rich_help_panel=MODEL,
    ),
]
Devices = Annotated[
    str,
    typer.Option(
        "--devices",
        help="Run on several devices of this machine at once, one worker each, on a local Ray "
        "instance (pip install 'pisa-cli[ray]'): GPU numbers (0,1,2,3), cuda:N, or cpu,cpu "
        "for CPU workers.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Shard = Annotated[
    str,
    typer.Option(
        "--shard",
        help="Run only share K of N (0-based K/N, e.g. 3/8) of the inputs, decided from the "
        "output names alone: for Slurm job arrays and indexed jobs. torchrun, accelerate "
        "launch and srun ranks take --shard RANK/WORLD_SIZE by themselves.",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Ray = Annotated[
    str,
    typer.Option(
        "--ray",
        help="Run on Ray Data (pip install 'pisa-cli[ray]'): --ray local starts an instance "
        "on this machine and its GPUs; --ray auto joins the cluster of RAY_ADDRESS or `ray "
        "job submit`; --ray ADDRESS (ray://host:10001, host:6379) joins that one.",
        metavar="local|auto|ADDRESS",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help=help_of(ModelOptions, "compile"),
        rich_help_panel=MODEL,
    ),
]
Scale = Annotated[
    int,
    typer.Option("--scale", help=help_of(UpscaleOptions, "scale"), rich_help_panel=QUALITY),
]
ProcessSize = Annotated[
    int,
    typer.Option(
        "--process-size",
        help=help_of(UpscaleOptions, "process_size"),
        rich_help_panel=QUALITY,
    ),
]
LambdaPix = Annotated[
    float,
    typer.Option(
        "--lambda-pix",
        help=help_of(UpscaleOptions, "lambda_pix"),
        rich_help_panel=QUALITY,
    ),
]
LambdaSem = Annotated[
    float,
    typer.Option(
        "--lambda-sem",
        help=help_of(UpscaleOptions, "lambda_sem"),
        rich_help_panel=QUALITY,
    ),
]
ColorFix = Annotated[
    str | None,
    typer.Option(
        "--color-fix",
        help=help_of(UpscaleOptions, "color_fix"),
        rich_help_panel=QUALITY,
    ),
]
Prompt = Annotated[
    str,
    typer.Option(
        "--prompt",
        help=help_of(UpscaleOptions, "prompt"),
        rich_help_panel=QUALITY,
    ),
]
Seed = Annotated[
    int | None,
    typer.Option("--seed", help=help_of(UpscaleOptions, "seed"), rich_help_panel=QUALITY),
]
VaeSample = Annotated[
    bool,
    typer.Option(
        "--vae-sample",
        help=help_of(UpscaleOptions, "vae_sample"),
        rich_help_panel=QUALITY,
    ),
]
Timestep = Annotated[
    int | None,
    typer.Option(
        "--timestep",
        help=help_of(UpscaleOptions, "timestep"),
        rich_help_panel=QUALITY,
        show_default=False,
    ),
]
LatentTile = Annotated[
    str,
    typer.Option(
        "--latent-tile",
        help=help_of(TileOptions, "latent_tile"),
        rich_help_panel=TILES,
    ),
]
LatentOverlap = Annotated[
    str,
    typer.Option(
        "--latent-overlap",
        help=help_of(TileOptions, "latent_overlap"),
        rich_help_panel=TILES,
    ),
]
VaeEncoderTile = Annotated[
    str,
    typer.Option(
        "--vae-encoder-tile",
        help=help_of(TileOptions, "vae_encoder_tile"),
        rich_help_panel=TILES,
    ),
]
VaeDecoderTile = Annotated[
    str,
    typer.Option(
        "--vae-decoder-tile",
        help=help_of(TileOptions, "vae_decoder_tile"),
        rich_help_panel=TILES,
    ),
]
TileBatch = Annotated[
    str,
    typer.Option(
        "--tile-batch",
        help=help_of(TileOptions, "tile_batch"),
        rich_help_panel=TILES,
    ),
]
ImageBatch = Annotated[
    str,
    typer.Option(
        "--image-batch",
        help=help_of(BatchOptions, "image_batch"),
        rich_help_panel=TILES,
    ),
]
Recursive = Annotated[
    bool,
    typer.Option(
        "--recursive",
        "-r",
        help=help_of(BatchOptions, "recursive"),
        rich_help_panel=INPUT,
    ),
]
MaxPixels = Annotated[
    int,
    typer.Option(
        "--max-pixels",
        help=help_of(BatchOptions, "max_pixels"),
        rich_help_panel=INPUT,
    ),
]
Format = Annotated[
    str,
    typer.Option(
        "--format",
        "-f",
        help=help_of(WriteOptions, "format"),
        rich_help_panel=OUTPUT,
    ),
]
Quality = Annotated[
    int,
    typer.Option(
        "--quality",
        help=help_of(WriteOptions, "quality"),
        rich_help_panel=OUTPUT,
    ),
]
Suffix = Annotated[
    str,
    typer.Option(
        "--suffix",
        help=help_of(WriteOptions, "suffix"),
        rich_help_panel=OUTPUT,
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help=help_of(BatchOptions, "overwrite"),
        rich_help_panel=OUTPUT,
    ),
]
Report = Annotated[
    str | None,
    typer.Option(
        "--report",
        metavar="<path>",
        help="Write what happened to each image (status, error, sizes, seconds per stage) to "
        "this .json or .csv file.",
        rich_help_panel=OUTPUT,
        show_default=False,
    ),
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print each image's plan (sizes, tiles, estimated memory) without loading the model.",
    ),
]
SECOND = "Second pass (x8)"
SecondPass = Annotated[
    str,
    typer.Option(
        "--second-pass",
        help=help_of(SecondPassOptions, "kind"),
        rich_help_panel=SECOND,
    ),
]
SecondPassWeights = Annotated[
    str,
    typer.Option(
        "--second-pass-weights",
        help=help_of(SecondPassOptions, "weights"),
        rich_help_panel=SECOND,
    ),
]
SecondPassTimestep = Annotated[
    int | None,
    typer.Option(
        "--second-pass-timestep",
        help=help_of(SecondPassOptions, "timestep"),
        rich_help_panel=SECOND,
    ),
]
SecondPassPrompt = Annotated[
    str,
    typer.Option(
        "--second-pass-prompt", help=help_of(SecondPassOptions, "prompt"), rich_help_panel=SECOND
    ),
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="Only print errors and the final summary.")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print debugging details.")]


def say(message: object = "", err: bool = False) -> None:
    """Print ``message`` as one line: control characters in it (from file names) are
    escaped, so a name can neither break the line nor forge another (``imaging.names``).
    A text of several lines is said a line at a time (``say_lines``)."""
    typer.echo(shown(message), err=err)


def say_lines(text: str, err: bool = False) -> None:
    """Our own text of several lines (a plan), each line said on its own."""
    for line in text.split("\n"):
        say(line, err=err)


def fail(error: PisaError) -> typer.Exit:
    """Print ``error`` as one line on stderr; return the Exit to raise."""
    say(f"error: {error}", err=True)
    return typer.Exit(error.exit_code)


class OneLineFormatter(logging.Formatter):
    """Each log message on one line, control characters from file names escaped (a
    traceback, with --verbose, follows on its own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message)
        return super().formatMessage(record)


class StderrHandler(logging.StreamHandler):
    """Lines to whatever ``sys.stderr`` is when a record comes, not the stream of the call
    that set logging up: a caller that runs the CLI with its own stderr and closes it after
    (a test runner, an embedding program) leaves no handler on a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Our messages on stderr (rich on a terminal, plain lines otherwise); quiet libraries."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("pisa_cli")
    root.handlers.clear()
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
        handler.setFormatter(OneLineFormatter("%(message)s"))
    else:
        handler = StderrHandler()
        handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _quiet_libraries(verbose)


def _quiet_libraries(verbose: bool) -> None:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("diffusers", "transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose and "transformers" in sys.modules:
        # imported before us (a second run in one process): it read the variable already
        sys.modules["transformers"].utils.logging.disable_progress_bar()
