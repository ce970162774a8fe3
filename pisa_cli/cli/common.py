"""Options shared by the commands that run the model (upscale, sweep), and console set-up.

Only typer, rich and the options module are imported here, so ``pisa --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from pisa_cli.errors import PisaError
from pisa_cli.imaging.names import shown
from pisa_cli.options import (
    BASE_MODEL_ENV,
    DEFAULT_BASE_MODEL,
    WEIGHTS_ENV,
)

MODEL = "Model"
QUALITY = "Lambdas and quality"
TILES = "Tiles and memory"
OUTPUT = "Output"
INPUT = "Input"

Inputs = Annotated[
    list[Path],
    typer.Argument(
        help="Image files, folders of images, and/or glob patterns ('shots/**/*.jpg').",
        show_default=False,
    ),
]
OutputDir = Annotated[
    Path, typer.Option("--output", "-o", help="Folder for the results (created if needed).")
]
BaseModel = Annotated[
    str,
    typer.Option(
        "--base-model",
        envvar=BASE_MODEL_ENV,
        help=f"SD 2.1-base: a Hugging Face hub id or a local diffusers folder "
        f"(default: {DEFAULT_BASE_MODEL}).",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Weights = Annotated[
    str,
    typer.Option(
        "--weights",
        envvar=WEIGHTS_ENV,
        help="The model's weights, which pick its family: PiSA-SR's pisa_sr.pkl or a "
        ".safetensors from `pisa convert`, an OMGSR-style folder holding unet_lora_adapter/ "
        "and vae_encoder_lora_adapter/ (OMGSR-S, TUDSR's LoRA-1), or HYPIR_sd2.pth "
        "(default: pisa_sr.safetensors or pisa_sr.pkl in ~/.cache/pisa-cli/).",
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto (CUDA, then Apple MPS, then CPU), cuda, cuda:N, mps or cpu.",
        rich_help_panel=MODEL,
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Compute precision: auto (bf16 where the GPU or CPU has it natively, else fp16 "
        "on GPUs and fp32 on CPUs), fp32, fp16, bf16. Use fp32 to compare with the "
        "reference script.",
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
        help="Compile the UNet and VAE with torch.compile (slow first image, faster after; "
        "falls back to normal execution where compiling fails).",
        rich_help_panel=MODEL,
    ),
]
Scale = Annotated[
    int,
    typer.Option(
        "--scale", help="Upscale factor; the model is trained for 4.", rich_help_panel=QUALITY
    ),
]
ProcessSize = Annotated[
    int,
    typer.Option(
        "--process-size",
        help="Inputs whose short side is below process-size/scale are enlarged to it first "
        "and the result is shrunk back to exactly scale times the input. HYPIR-SD2: its "
        "window side in pixels (a multiple of 8; latent windows of process-size/8).",
        rich_help_panel=QUALITY,
    ),
]
LambdaPix = Annotated[
    float,
    typer.Option(
        "--lambda-pix",
        help="Strength of the pixel-level LoRA (fidelity, noise removal).",
        rich_help_panel=QUALITY,
    ),
]
LambdaSem = Annotated[
    float,
    typer.Option(
        "--lambda-sem",
        help="Strength of the semantic-level LoRA (generated detail); 0 = pixel LoRA only. "
        "Equal lambdas or lambda-sem 0 cost one UNet pass, others two.",
        rich_help_panel=QUALITY,
    ),
]
ColorFix = Annotated[
    str | None,
    typer.Option(
        "--color-fix",
        help="Colour correction against the bicubic input: adain (mean and spread per "
        "channel), wavelet (low frequencies of the input), none (default adain; HYPIR-SD2 "
        "wavelet, in float).",
        rich_help_panel=QUALITY,
    ),
]
Prompt = Annotated[
    str,
    typer.Option(
        "--prompt",
        help="Text prompt for the UNet; the model was trained with the empty prompt.",
        rich_help_panel=QUALITY,
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed", help="Seed for --vae-sample (reproducible sampling).", rich_help_panel=QUALITY
    ),
]
VaeSample = Annotated[
    bool,
    typer.Option(
        "--vae-sample",
        help="Sample the VAE latent as the reference does, instead of its mean (deterministic).",
        rich_help_panel=QUALITY,
    ),
]
Timestep = Annotated[
    int | None,
    typer.Option(
        "--timestep",
        help="UNet timestep: OMGSR-style (default: its folder's, else 273, OMGSR-S's), "
        "HYPIR-SD2 (model_t = coeff_t, default 200); PiSA-SR runs at t = 1.",
        rich_help_panel=QUALITY,
        show_default=False,
    ),
]
LatentTile = Annotated[
    str,
    typer.Option(
        "--latent-tile",
        help="UNet tile side in latent pixels (1 latent pixel = 8 image pixels); latents of "
        "up to tile x tile pixels are not tiled. auto: the reference's (PiSA-SR 96; "
        "OMGSR-style process-size/8), smaller only when memory is short.",
        rich_help_panel=TILES,
    ),
]
LatentOverlap = Annotated[
    str,
    typer.Option(
        "--latent-overlap",
        help="Overlap of UNet tiles in latent pixels, blended with Gaussian weights. auto: "
        "the reference's (PiSA-SR 32; OMGSR-style and HYPIR-SD2 half the tile).",
        rich_help_panel=TILES,
    ),
]
VaeEncoderTile = Annotated[
    str,
    typer.Option(
        "--vae-encoder-tile",
        help="VAE encoder tile side in image pixels: larger images are encoded in bands "
        "holding at most a tile's activations, with the same result. auto: the whole image "
        "when it fits in memory.",
        rich_help_panel=TILES,
    ),
]
VaeDecoderTile = Annotated[
    str,
    typer.Option(
        "--vae-decoder-tile",
        help="VAE decoder tile side in latent pixels, like --vae-encoder-tile.",
        rich_help_panel=TILES,
    ),
]
TileBatch = Annotated[
    str,
    typer.Option(
        "--tile-batch",
        help="UNet tiles per call. auto: as many as fit in memory (at most 8).",
        rich_help_panel=TILES,
    ),
]
ImageBatch = Annotated[
    str,
    typer.Option(
        "--image-batch",
        help="Images of one size per model call (and sweep points per decoder call), 1 to 64, "
        "never more than fit in memory; outputs do not depend on it. auto: as many as fit "
        "on a GPU (at most 16), 1 on a CPU, where batches gain nothing measurable.",
        rich_help_panel=TILES,
    ),
]
Recursive = Annotated[
    bool,
    typer.Option(
        "--recursive",
        "-r",
        help="Also upscale the images in sub-folders, mirroring the tree in the output folder.",
        rich_help_panel=INPUT,
    ),
]
MaxPixels = Annotated[
    int,
    typer.Option(
        "--max-pixels",
        help="Refuse inputs with more pixels (width x height) than this, before decoding them "
        "(also stops decompression bombs).",
        rich_help_panel=INPUT,
    ),
]
Format = Annotated[
    str,
    typer.Option(
        "--format",
        "-f",
        help="Output format: png, jpg, webp, tiff, or same (the input's; png when it cannot be "
        "written). 16 bits per channel need png or tiff; transparency needs png, webp or tiff.",
        rich_help_panel=OUTPUT,
    ),
]
Quality = Annotated[
    int,
    typer.Option(
        "--quality",
        help="jpg and webp quality, 1-100 (webp 100 is lossless); png and tiff are lossless.",
        rich_help_panel=OUTPUT,
    ),
]
Suffix = Annotated[
    str,
    typer.Option(
        "--suffix",
        help="Added to output names before the extension (--suffix _x4: photo_x4.png).",
        rich_help_panel=OUTPUT,
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Redo outputs that exist. Without it, outputs that the manifest says were made "
        "with these settings from this input are skipped (resume), outputs made with other "
        "settings are redone, and files pisa did not write are kept.",
        rich_help_panel=OUTPUT,
    ),
]
Report = Annotated[
    Path | None,
    typer.Option(
        "--report",
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
        help="After the x4 pass, one more x2 pass: tudsr (a second LoRA on the same backbone, "
        "TUDSR-style; needs --second-pass-weights) or pisa (PiSA-SR again on its own output, "
        "a fallback without extra weights); none by default.",
        rich_help_panel=SECOND,
    ),
]
SecondPassWeights = Annotated[
    str,
    typer.Option(
        "--second-pass-weights",
        help="LoRA of the tudsr pass: a peft adapter folder (adapter_config.json + "
        "adapter_model.safetensors), a diffusers LoRA .safetensors, or an OMGSR-style "
        "folder (unet_lora_adapter/ + vae_encoder_lora_adapter/).",
        rich_help_panel=SECOND,
    ),
]
SecondPassTimestep = Annotated[
    int | None,
    typer.Option(
        "--second-pass-timestep",
        help="UNet timestep of the tudsr pass (default: the one stored in the LoRA file; "
        "an OMGSR-style folder without one: 273).",
        rich_help_panel=SECOND,
    ),
]
SecondPassPrompt = Annotated[
    str,
    typer.Option("--second-pass-prompt", help="Prompt of the tudsr pass.", rich_help_panel=SECOND),
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
        handler = logging.StreamHandler(sys.stderr)
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
