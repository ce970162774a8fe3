"""A HYPIR-SD2 pass inside the pipeline: its plan (for --dry-run, the batcher and the
guard) and its run under the pipeline's recovery.

Recovery keeps the output: out of memory, the UNet first halves its windows per call, the
VAE then runs each window in bands (the same result); a low precision that gives inf or NaN
is redone in fp32, as for the other families. The window itself never shrinks (it is the
model's patch_size). A HYPIR image runs alone in a batch of images (its plan names VAE
tiles, which the batcher keeps to one image per call).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from pisa_cli.core.families.hypir_steps import (
    LATENT_CHANNELS,
    HypirParts,
    HypirSettings,
    decode_windows,
    encode_windows,
    step_windows,
)
from pisa_cli.core.families.hypir_tiles import (
    VAE_FACTOR,
    enlarged_size,
    finish_output,
    plan_windows,
)
from pisa_cli.core.latents import Encoded, as_rgb, timed, to_deep, to_image, to_tensor
from pisa_cli.core.planning import ImagePlan
from pisa_cli.engine import memory
from pisa_cli.imaging.deep import DeepImage
from pisa_cli.imaging.resize import ResizePlan
from pisa_cli.options import UpscaleOptions

if TYPE_CHECKING:
    from PIL import Image

    from pisa_cli.core.passes import PassPlan

TILING = "windows"


def plan_hypir(
    size: tuple[int, int],
    options: UpscaleOptions,
    widths: memory.Widths,
    dtype_bytes: int,
    free_bytes: int,
) -> ImagePlan:
    """The plan of a HYPIR pass over an input of ``size`` (width, height): its windows,
    windows per UNet call (auto: as many as fit), VAE tiles (the window, or the smaller
    --vae-encoder-tile / --vae-decoder-tile: each window in bands) and an estimate of its
    working memory."""
    settings = HypirSettings.from_options(options)
    width, height = size
    work_h, work_w = enlarged_size(height * options.scale, width * options.scale, settings.patch)
    padded_h, padded_w = work_h + (-work_h) % VAE_FACTOR, work_w + (-work_w) % VAE_FACTOR
    latent_h, latent_w = padded_h // VAE_FACTOR, padded_w // VAE_FACTOR
    window, stride = settings.patch // VAE_FACTOR, settings.stride // VAE_FACTOR
    unet = plan_windows(latent_h, latent_w, window, stride)
    per_window = memory.unet_tile_bytes(window, window, widths.unet, dtype_bytes)
    batch = settings.tile_batch or memory.auto_tile_batch(
        len(unet.tiles), 1, per_window, free_bytes
    )
    batch = min(batch, len(unet.tiles))
    sums = 4 * (padded_h * padded_w) * (3 + 1) + 4 * latent_h * latent_w * (LATENT_CHANNELS + 1)
    peak = sums + max(
        memory.encoder_untiled_bytes(settings.patch, settings.patch, widths, dtype_bytes),
        per_window * batch,
        memory.decoder_untiled_bytes(window, window, widths, dtype_bytes),
    )
    return ImagePlan(
        resize=ResizePlan(size, size, options.scale, VAE_FACTOR),
        model_size=(padded_w, padded_h),
        latent_size=(latent_h, latent_w),
        variants=("first",),
        unet=unet,
        latent_tile=window,
        latent_overlap=window - stride,
        tile_batch=batch,
        tiling=TILING,
        encoder_tile=min(settings.patch, options.tiles.vae_encoder_tile or settings.patch),
        decoder_tile=min(window, options.tiles.vae_decoder_tile or window),
        store="ram",
        peak_bytes=peak,
        free_bytes=free_bytes,
    )


def run_hypir(
    pipe: Any,
    image: Image.Image | DeepImage,
    stage: PassPlan,
    timings: dict[str, float],
    notes: list[str],
) -> tuple[Image.Image | DeepImage, ImagePlan]:
    """One HYPIR pass of ``pipe`` (a PisaPipeline, which imports this module) over
    ``image``: the finished image (8-bit truncated once, or a DeepImage for 16-bit inputs)
    and the plan as run."""
    from pisa_cli.core.families.hypir_tiles import prepare_input

    settings = HypirSettings.from_options(stage.options)
    prefix = f"{stage.name}_" if stage.name else ""
    models = pipe.models
    device = models.device
    with timed(timings, prefix + "preprocess"):
        rgb = as_rgb(image)
        plan = pipe.plan(rgb.size, stage.options, stage.variants, TILING, stage.planner)
        prepared = prepare_input(to_tensor(rgb).to(device), settings.scale, settings.patch)
    with timed(timings, prefix + "text"):
        cond = models.embed(settings.prompt)
    alphas = models.scheduler.alphas_cumprod  # type: ignore[attr-defined]
    parts = HypirParts(models.unet, models.vae, cond, alphas)

    def encode(tile: int | None, store: str) -> Encoded:
        latents = encode_windows(parts, prepared, settings, tile, store)
        return Encoded(latents=latents, source=prepared.ref, size=prepared.work_size)

    def predict(current: ImagePlan) -> dict:
        return {"first": step_windows(parts, encoded.latents, settings, current.tile_batch)}

    with timed(timings, prefix + "encode", device):
        encoded, plan = pipe.guard.encode(encode, plan, notes, models.vae)
    with timed(timings, prefix + "unet", device):
        x0, plan = pipe.guard.predict(predict, plan, notes)
    with timed(timings, prefix + "decode", device):
        decode = partial(decode_windows, parts, x0["first"], settings)
        decoded, plan = pipe.guard.decode(decode, plan, notes)
        del x0
    with timed(timings, prefix + "color"):
        result = finish_output(decoded, prepared, settings.color_fix)
        final = to_deep(result) if isinstance(image, DeepImage) else to_image(result)
    return final, plan
