"""The PiSA-SR pipeline: one image in, one image out, every stage of REFERENCE sections 3-4.

``PisaPipeline.upscale`` takes an RGB PIL image and returns the upscaled one (``loading``
makes the pipeline). A pass is four public stages, what `pisa upscale`, `pisa sweep` and
the bench call: ``prepare_latents`` (plan, upsample, prompt, encode), ``predict_eps`` (the
UNet over latent tiles), ``decode_latents``, ``finish_image`` (truncate, colour fix, shrink
back); each model stage runs under ``recovery``'s guard. ``upscale_many`` runs several
images of one shape through shared model calls (``batching``). The raw model calls
(embed, encode, predict, step, decode) are ``models.Models``'s, which the pipeline holds.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from PIL import Image

from pisa_cli.core.batching import Batcher, BatchState
from pisa_cli.core.latents import Latents, UpscaleResult, as_rgb, timed, to_deep, to_image
from pisa_cli.core.models import Models
from pisa_cli.core.passes import Passes, PassPlan, Planner
from pisa_cli.core.planning import ImagePlan, plan_image
from pisa_cli.core.recovery import StageGuard
from pisa_cli.engine import color
from pisa_cli.engine.tiles import Tiling
from pisa_cli.imaging.deep import DEEP_MAX, DeepImage
from pisa_cli.imaging.resize import restore_size, upsample_input
from pisa_cli.models.device import free_memory, host_free_memory
from pisa_cli.options import UpscaleOptions

log = logging.getLogger(__name__)


class PisaPipeline:
    """Models loaded once (``models``), ready to upscale any number of images: the stages
    of a pass and whole images over them."""

    def __init__(self, models: Models, passes: Passes | None = None):
        self.models = models
        """The models and their raw calls (embed, encode, predict, step, decode)."""
        self.guard = StageGuard(models.vae, models.dtype, models.unet)
        self.batch_state = BatchState()
        """What batches of this pipeline learned (images per call that fit), for the next."""
        self.passes = passes or _default_passes(models.steps)
        """What each pass runs (families, timesteps), decided by what was loaded."""

    def stages(self, options: UpscaleOptions) -> list[PassPlan]:
        """The passes ``options`` ask for (``Passes.stages``)."""
        return self.passes.stages(options)

    def describe(self, options: UpscaleOptions) -> list[str]:
        """What runs, for the log: each pass's family, weights and timestep."""
        return self.passes.describe(options)

    def plan(
        self,
        size: tuple[int, int],
        options: UpscaleOptions,
        variants: tuple[str, ...] | None = None,
        tiling: Tiling = "stablesr",
        planner: Planner | None = None,
    ) -> ImagePlan:
        """The plan for an input of ``size`` (width, height) in the memory free right now."""
        models = self.models
        free, host = free_memory(models.device), host_free_memory(models.device)
        itemsize, widths = models.dtype.itemsize, models.widths
        if planner is not None:  # the family's own tiler
            return planner(size, options, widths, itemsize, free, host, variants)
        return plan_image(size, options, widths, itemsize, free, variants, tiling, host)

    # --- whole images -------------------------------------------------------------------
    def upscale(self, image: Image.Image, options: UpscaleOptions | None = None) -> Image.Image:
        """Upscale an RGB image by ``options.scale``."""
        return self.upscale_with_info(image, options).image

    def upscale_with_info(
        self, image: Image.Image, options: UpscaleOptions | None = None
    ) -> UpscaleResult:
        """Upscale an RGB image (and run the second pass, if any), retrying a stage with
        smaller tiles when memory runs out and in fp32 when a low-precision pass gives inf or
        NaN (NonFiniteError when fp32 does too). A DeepImage (16-bit input) goes through in
        float and comes back as one."""
        options = options or UpscaleOptions()
        timings: dict[str, float] = {}
        notes: list[str] = []
        plans = []
        for stage in self.stages(options):
            image, plan = self.run_stage(image, stage, timings, notes)
            plans.append(plan)
        second = plans[1] if len(plans) > 1 else None
        return UpscaleResult(image, plans[0], timings, notes, second)

    def run_stage(
        self, image: Image.Image, stage: PassPlan, timings: dict[str, float], notes: list[str]
    ) -> tuple[Image.Image, ImagePlan]:
        """One pass of ``stage`` over ``image``: the finished image and the plan as run."""
        if stage.runner is not None:  # the family's own path (rule own)
            return stage.runner(self, image, stage, timings, notes)
        prefix = f"{stage.name}_" if stage.name else ""
        latents = self.prepare_latents(image, stage, timings, notes)
        eps = self.predict_eps(latents, stage, timings, notes)
        with timed(timings, prefix + "unet", self.models.device):
            z_high = self.models.step(latents.encoded.latents, eps, stage)
            del eps
        decoded = self.decode_latents(z_high, latents, timings, notes, prefix)
        with timed(timings, prefix + "color"):
            result = self.finish_image(decoded, latents, stage.options.color_fix)
        return result, latents.plan

    # --- several images at once (``core.batching``) ------------------------------------
    @property
    def batcher(self) -> Batcher:
        """A batcher for one call (it holds this pipeline; this pipeline holds only its
        ``batch_state``: no reference cycle)."""
        return Batcher(self, self.batch_state)

    def batching(self, image: Image.Image, options: UpscaleOptions, requested: int | None):
        """(key, size): images of equal keys may share model calls, ``size`` at a time (a
        key of None: alone)."""
        return self.batcher.batching(image, options, requested)

    def upscale_many(self, images: list, options: UpscaleOptions, requested: int | None = None):
        """Each image's UpscaleResult, or the error that stopped it, in order: images of a
        shape share calls, ``requested`` at a time (None: auto)."""
        return self.batcher.upscale(images, options, requested)

    # --- the stages of a pass, public: pisa upscale, pisa sweep and the bench call them ----
    def prepare_latents(
        self, image: Image.Image, stage: PassPlan, timings: dict[str, float], notes: list[str]
    ) -> Latents:
        """Preprocess (plan, upsample), embed the prompt and encode: z_L of ``image``."""
        options, models = stage.options, self.models
        prefix = f"{stage.name}_" if stage.name else ""
        deep = isinstance(image, DeepImage)
        with timed(timings, prefix + "preprocess"):
            rgb = as_rgb(image)
            plan = self.plan(rgb.size, options, stage.variants, stage.tiling, stage.planner)
            upsampled = upsample_input(rgb, plan.resize)
        with timed(timings, prefix + "text"):
            cond = models.embed(options.prompt)
        with timed(timings, prefix + "encode", models.device):
            encode = partial(models.encode, upsampled, options, encoder=stage.encoder)
            vae = models.vae_for(stage.encoder)
            encoded, plan = self.guard.encode(encode, plan, notes, vae)
        return Latents(plan=plan, cond=cond, encoded=encoded, deep=deep)

    def predict_eps(
        self, latents: Latents, stage: PassPlan, timings: dict[str, float], notes: list[str]
    ) -> dict[str, torch.Tensor]:
        """eps of each of the stage's UNet variants over the latent tiles (retried with
        smaller tiles when memory runs out; ``latents.plan`` follows)."""
        prefix = f"{stage.name}_" if stage.name else ""
        models = self.models
        with timed(timings, prefix + "unet", models.device):
            z_low, cond = latents.encoded.latents, latents.cond

            def predict(plan: ImagePlan) -> dict[str, torch.Tensor]:
                tiles, batch = plan.unet, plan.tile_batch
                return models.predict(z_low, cond, plan.variants, tiles, batch, stage.timestep)

            eps, latents.plan = self.guard.predict(predict, latents.plan, notes)
        return eps

    def decode_latents(
        self,
        z_high: torch.Tensor,
        latents: Latents,
        timings: dict[str, float],
        notes: list[str],
        prefix: str = "",
    ) -> torch.Tensor:
        """The decoded image in [0, 1] of ``z_high`` (retried with smaller tiles when memory
        runs out, in fp32 when a low precision gives inf or NaN)."""
        with timed(timings, prefix + "decode", self.models.device):
            decode = partial(self.models.decode, z_high, latents.encoded.size)
            decoded, latents.plan = self.guard.decode(decode, latents.plan, notes)
        return decoded

    def finish_image(self, decoded: torch.Tensor, latents: Latents, method: str):
        """The finished image of a pass: truncated, colour-fixed against the bicubic input,
        shrunk back for an enlarged small input (a DeepImage for 16-bit inputs)."""
        levels = DEEP_MAX if latents.deep else 255
        fixed = finish_decoded(decoded, latents.encoded.source, method, levels)
        image = to_deep(fixed) if latents.deep else to_image(fixed)
        return restore_size(image, latents.plan.resize)


def _default_passes(steps: int) -> Passes:
    """A pipeline built without ``passes``: PiSA-SR's (the default family)."""
    from pisa_cli.core.families import family_of
    from pisa_cli.core.passes import PassWeights

    return Passes(PassWeights(family_of("")), timesteps=steps)


def finish_decoded(
    decoded: torch.Tensor, source: torch.Tensor, method: str, levels: int = 255
) -> torch.Tensor:
    """The 8-bit output of the reference: truncate, colour-fix, (the writer truncates again).
    ``levels`` DEEP_MAX: the same on the 16-bit grid, for 16-bit inputs."""
    return color.color_fix(method, color.quantize(decoded, levels), source)
