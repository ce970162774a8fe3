"""HYPIR-SD2 on one image (REFERENCE section 10): the settings a run gives it and the runner
that takes the loaded parts (UNet with its LoRA merged, VAE, prompt embedding, scheduler
alphas) from an image to the upscaled image.

The three stages are HYPIR's all-stage tiler (``hypir_tiles.tiled_map``): the encoder on
patch-pixel windows, the UNet step on patch / 8 latent windows (eps at model_t, x0 with
coeff_t), the decoder (unclamped) on the same latent windows. Everything stays float until
the single quantization at the end (8-bit truncated as the official, or 16-bit for 16-bit
inputs). The VAE posterior's mean is used unless ``vae_sample`` (seeded by ``seed``): the
official samples from torch's global RNG, so its output depends on what ran before.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from pisa_cli.core.families.hypir_tiles import (
    DEFAULT_PATCH,
    DEFAULT_STRIDE,
    DEFAULT_TIMESTEP,
    VAE_FACTOR,
    Prepared,
    finish_output,
    plan_windows,
    prepare_input,
    tiled_map,
    x0_rule,
)
from pisa_cli.core.latents import timed, to_deep, to_image, to_tensor
from pisa_cli.engine import vae as vae_engine
from pisa_cli.engine.tiles import TilePlan
from pisa_cli.errors import OptionsError
from pisa_cli.imaging.deep import DeepImage
from pisa_cli.options import COLOR_FIXES, UpscaleOptions

LATENT_CHANNELS = 4
DEFAULT_COLOR_FIX = "wavelet"
"""HYPIR's colour fix, done in float before the quantization."""


@dataclass(frozen=True)
class HypirSettings:
    """What one HYPIR pass does to an image."""

    scale: int = 4
    patch: int = DEFAULT_PATCH
    """patch_size: the encoder's window in pixels; the UNet's and decoder's is patch / 8."""
    stride: int = DEFAULT_STRIDE
    """Step between windows in pixels (stride / 8 in latent pixels)."""
    model_t: int = DEFAULT_TIMESTEP
    """The UNet's timestep."""
    coeff_t: int = DEFAULT_TIMESTEP
    """The timestep whose alpha_bar turns eps into x0."""
    prompt: str = ""
    color_fix: str = DEFAULT_COLOR_FIX
    vae_sample: bool = False
    """Sample the VAE posterior (seeded by ``seed``) instead of taking its mean."""
    seed: int | None = None
    tile_batch: int | None = None
    """UNet windows per call (None: as many as fit; the output does not depend on it
    beyond float noise). The VAE takes one window at a time."""

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise OptionsError(message)

        check(1 <= self.scale <= 16, f"--scale {self.scale} must be a whole number from 1 to 16")
        check(
            self.patch >= 8 * VAE_FACTOR and self.patch % VAE_FACTOR == 0,
            f"--process-size {self.patch}: HYPIR's patch must be a multiple of {VAE_FACTOR} "
            f"and at least {8 * VAE_FACTOR} (the official code crashes on others)",
        )
        check(
            0 < self.stride <= self.patch and self.stride % VAE_FACTOR == 0,
            f"HYPIR's window stride {self.stride} must be a multiple of {VAE_FACTOR} from "
            f"{VAE_FACTOR} to the patch {self.patch} (--latent-overlap below patch / 8)",
        )
        check(
            self.model_t >= 0 and self.coeff_t >= 0,
            f"--timestep {self.model_t} must be 0 or more",
        )
        check(self.color_fix in COLOR_FIXES, f"--color-fix {self.color_fix!r} is unknown")
        check(
            self.tile_batch is None or self.tile_batch >= 1,
            f"--tile-batch {self.tile_batch} must be at least 1",
        )

    @classmethod
    def from_options(cls, options: UpscaleOptions, color_fix: str | None = None) -> HypirSettings:
        """The settings of ``options``: --process-size is the patch, --latent-overlap
        (patch - stride) / 8 (default half the latent window), --timestep model_t and
        coeff_t together. ``color_fix`` None: ``options``' (the caller decides whether the
        user named one or HYPIR's wavelet applies)."""
        patch = options.process_size
        tiles = options.tiles
        window = patch // VAE_FACTOR
        if tiles.latent_tile is not None and tiles.latent_tile != window:
            raise OptionsError(
                f"--latent-tile {tiles.latent_tile}: HYPIR's latent window is --process-size "
                f"/ 8 ({window}); set --process-size instead"
            )
        overlap = window // 2 if tiles.latent_overlap is None else tiles.latent_overlap
        if not 0 <= overlap < window:
            raise OptionsError(
                f"--latent-overlap {overlap} must be at least 0 and below HYPIR's latent window "
                f"{window} (--process-size {patch} / 8)"
            )
        timestep = DEFAULT_TIMESTEP if options.timestep is None else options.timestep
        return cls(
            scale=options.scale,
            patch=patch,
            stride=patch - VAE_FACTOR * overlap,
            model_t=timestep,
            coeff_t=timestep,
            prompt=options.prompt,
            color_fix=color_fix or options.color_fix,
            vae_sample=options.vae_sample,
            seed=options.seed,
            tile_batch=tiles.tile_batch,
        )


UNetFn = Callable[..., torch.Tensor]
"""``models.lora.PisaUNet``'s call: (latents, cond, variants, timestep=t) -> eps."""


@dataclass
class HypirParts:
    """The loaded models a HYPIR pass runs on (the UNet with HYPIR's LoRA merged)."""

    unet: UNetFn
    vae: torch.nn.Module
    cond: torch.Tensor
    """The prompt's embedding, on the device in the models' dtype."""
    alphas_cumprod: torch.Tensor
    variant: str = "first"
    """The UNet weight set that holds HYPIR's LoRA."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage, added to on every call (preprocess, encode, unet, decode, color)."""

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


def alpha_bar(parts: HypirParts, timestep: int) -> float:
    """alpha_bar of ``timestep``; OptionsError outside the scheduler's range."""
    steps = len(parts.alphas_cumprod)
    if not 0 <= timestep < steps:
        raise OptionsError(f"--timestep {timestep} must be from 0 to {steps - 1}")
    return float(parts.alphas_cumprod[timestep])


def encode_windows(
    parts: HypirParts,
    prepared: Prepared,
    settings: HypirSettings,
    tile: int | None = None,
    store: str = "ram",
) -> torch.Tensor:
    """Stage 1: the scaled latents (float32) of the prepared image, encoded window by window
    (``tile`` below the patch: each window in bands, with the same result)."""
    generator = _generator(settings, parts.device)
    band = None if tile is None or tile >= settings.patch else tile

    def encode(window: torch.Tensor) -> torch.Tensor:
        return vae_engine.encode(
            parts.vae, window, settings.vae_sample, generator, tile=band, store=store
        )

    image = prepared.model_input.to(parts.device, parts.dtype)
    plan = plan_windows(*image.shape[-2:], settings.patch, settings.stride)
    with torch.inference_mode():
        return tiled_map(encode, image, plan, LATENT_CHANNELS, down=VAE_FACTOR)


def step_windows(
    parts: HypirParts, latents: torch.Tensor, settings: HypirSettings, tile_batch: int = 1
) -> torch.Tensor:
    """Stage 2: x0 (float32) of the latents, window by window: eps at model_t, x0 with
    coeff_t's alpha_bar; ``tile_batch`` windows per UNet call."""
    abar = alpha_bar(parts, settings.coeff_t)
    alpha_bar(parts, settings.model_t)

    def step(window: torch.Tensor) -> torch.Tensor:
        eps = parts.unet(window, parts.cond, (parts.variant,), timestep=settings.model_t)
        return x0_rule(window.float(), eps.float(), abar)

    dtype = getattr(parts.unet, "dtype", parts.dtype)
    latents = latents.to(parts.device, dtype)
    plan = _latent_windows(latents, settings)
    with torch.inference_mode():
        return tiled_map(step, latents, plan, LATENT_CHANNELS, tile_batch=tile_batch)


def decode_windows(
    parts: HypirParts,
    latents: torch.Tensor,
    settings: HypirSettings,
    tile: int | None = None,
    store: str = "ram",
) -> torch.Tensor:
    """Stage 3: the decoded image (float32, unclamped, padded), window by window (``tile``
    below the latent window: each window in bands, with the same result)."""
    window = settings.patch // VAE_FACTOR
    band = None if tile is None or tile >= window else tile

    def decode(part: torch.Tensor) -> torch.Tensor:
        return vae_engine.decode(parts.vae, part, tile=band, store=store, clamp=False)

    latents = latents.to(parts.device, parts.dtype)
    plan = _latent_windows(latents, settings)
    with torch.inference_mode():
        return tiled_map(decode, latents, plan, 3, up=VAE_FACTOR)


def _latent_windows(latents: torch.Tensor, settings: HypirSettings) -> TilePlan:
    window, stride = settings.patch // VAE_FACTOR, settings.stride // VAE_FACTOR
    return plan_windows(*latents.shape[-2:], window, stride)


def upscale_tensor(parts: HypirParts, image: torch.Tensor, settings: HypirSettings) -> torch.Tensor:
    """HYPIR on (N, 3, H, W) float ``image`` in [0, 1]: (N, 3, sH, sW) float in [0, 1],
    before the quantization (the three stages without recovery: the pipeline's
    ``run_stage`` runs them under its guard)."""
    device, timings = parts.device, parts.timings
    with timed(timings, "preprocess"):
        prepared = prepare_input(image.to(device), settings.scale, settings.patch)
    with timed(timings, "encode", device):
        latents = encode_windows(parts, prepared, settings)
    with timed(timings, "unet", device):
        latents = step_windows(parts, latents, settings, settings.tile_batch or 1)
    with timed(timings, "decode", device):
        decoded = decode_windows(parts, latents, settings)
    with timed(timings, "color"):
        return finish_output(decoded, prepared, settings.color_fix)


def _generator(settings: HypirSettings, device: torch.device) -> torch.Generator | None:
    """The noise of --vae-sample: seeded by --seed, else by a fresh seed."""
    if not settings.vae_sample:
        return None
    seed = settings.seed if settings.seed is not None else secrets.randbelow(2**31)
    return torch.Generator(device).manual_seed(seed)


def upscale_image(
    parts: HypirParts, image: Image.Image | DeepImage, settings: HypirSettings
) -> Image.Image | DeepImage:
    """HYPIR on one image: 8-bit RGB in, 8-bit out (truncated once, as the official); a
    DeepImage (16-bit input) in, a DeepImage out."""
    deep = isinstance(image, DeepImage)
    if not deep and image.mode != "RGB":
        image = image.convert("RGB")
    result = upscale_tensor(parts, to_tensor(image), settings)
    return to_deep(result) if deep else to_image(result)
