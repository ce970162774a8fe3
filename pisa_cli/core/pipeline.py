"""The PiSA-SR pipeline: one image in, one image out, every stage of REFERENCE sections 3-4.

``PisaPipeline.upscale`` takes an RGB PIL image and returns the upscaled one (``loading``
makes the pipeline). A pass is four public stages, what `pisa upscale`, `pisa sweep` and
the bench call: ``prepare_latents`` (plan, upsample, prompt, encode), ``predict_eps`` (the
UNet over latent tiles), ``decode_latents``, ``finish_image`` (truncate, colour fix, shrink
back); each model stage runs under ``recovery``'s guard. ``upscale_many`` runs several
images of one shape through shared model calls (``batching``).
"""

from __future__ import annotations

import logging
import secrets
from functools import partial

import torch
import torch.nn.functional as F
from PIL import Image

from pisa_cli.core.batching import Batcher, BatchState
from pisa_cli.core.latents import (
    Encoded,
    Latents,
    UpscaleResult,
    as_rgb,
    timed,
    to_deep,
    to_image,
    to_tensor,
)
from pisa_cli.core.passes import Passes, PassPlan, Planner
from pisa_cli.core.planning import ImagePlan, plan_image
from pisa_cli.core.recovery import StageGuard
from pisa_cli.engine import color, memory, vae
from pisa_cli.engine.denoise import combine_eps, predict_eps, x0_from_eps
from pisa_cli.engine.tiles import TilePlan, Tiling
from pisa_cli.engine.vae import Store
from pisa_cli.imaging.deep import DEEP_MAX, DeepImage
from pisa_cli.imaging.resize import restore_size, upsample_input
from pisa_cli.models.device import free_memory, host_free_memory
from pisa_cli.models.lora import PisaUNet
from pisa_cli.models.text import PromptEncoder
from pisa_cli.options import UpscaleOptions

log = logging.getLogger(__name__)


class PisaPipeline:
    """Models loaded once, ready to upscale any number of images."""

    def __init__(
        self,
        unet: PisaUNet,
        vae_model: torch.nn.Module,
        prompts: PromptEncoder,
        scheduler: object,
        device: torch.device,
        dtype: torch.dtype,
        passes: Passes | None = None,
        second_vae: torch.nn.Module | None = None,
    ):
        self.unet = unet
        self.vae = vae_model
        self.prompts = prompts
        self.scheduler = scheduler
        self.device = device
        self.dtype = dtype
        vae_config = vae_model.config  # type: ignore[union-attr]
        self.vae_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        self.widths = memory.Widths(
            unet=int(unet.unet.config.block_out_channels[0]),  # type: ignore[union-attr]
            vae=int(vae_config.block_out_channels[0]),
            vae_factor=self.vae_factor,
        )
        self.guard = StageGuard(self.vae, dtype, unet)
        self.batch_state = BatchState()
        """What batches of this pipeline learned (images per call that fit), for the next."""
        steps = len(scheduler.alphas_cumprod)  # type: ignore[attr-defined]
        self.passes = passes or _default_passes(steps)
        """What each pass runs (families, timesteps), decided by what was loaded."""
        self.second_vae = second_vae
        """The VAE with the second pass's encoder, when it differs from the first's (the
        decoder is the same module)."""

    @property
    def family(self) -> str:
        """The name of the first pass's family (``core.families``)."""
        return self.passes.first.family.name

    @property
    def second_family(self) -> str:
        return self.passes.second.family.name if self.passes.second else ""

    def stages(self, options: UpscaleOptions) -> list[PassPlan]:
        """The passes ``options`` ask for (``Passes.stages``)."""
        return self.passes.stages(options)

    def describe(self, options: UpscaleOptions) -> list[str]:
        """What runs, for the log: each pass's family, weights and timestep."""
        return self.passes.describe(options)

    def compile(self) -> None:
        """torch.compile the UNet and the untiled VAE passes (eager where that fails)."""
        from pisa_cli.models.compiled import CompiledOrEager

        self.unet.compile()
        parts = [("encoder", self.vae.encoder), ("decoder", self.vae.decoder)]
        if self.second_vae is not None:
            parts.append(("second-pass encoder", self.second_vae.encoder))
        for name, part in parts:
            part.forward = CompiledOrEager(part.forward, f"VAE {name}")

    def vae_for(self, encoder: str) -> torch.nn.Module:
        """The VAE whose encoder is that of pass ``encoder`` (first or second)."""
        if encoder == "second" and self.second_vae is not None:
            return self.second_vae
        return self.vae

    # --- stages -------------------------------------------------------------------------
    def plan(
        self,
        size: tuple[int, int],
        options: UpscaleOptions,
        variants: tuple[str, ...] | None = None,
        tiling: Tiling = "stablesr",
        planner: Planner | None = None,
    ) -> ImagePlan:
        """The plan for an input of ``size`` (width, height) in the memory free right now."""
        free, host = free_memory(self.device), host_free_memory(self.device)
        itemsize = self.dtype.itemsize
        if planner is not None:  # the family's own tiler
            return planner(size, options, self.widths, itemsize, free, host, variants)
        return plan_image(size, options, self.widths, itemsize, free, variants, tiling, host)

    @torch.inference_mode()
    def embed(self, prompt: str) -> torch.Tensor:
        """The prompt embedding on the device (computed once per prompt)."""
        return self.prompts(prompt).to(self.device, self.dtype)

    @torch.inference_mode()
    def encode(
        self,
        upsampled: Image.Image,
        options: UpscaleOptions,
        tile: int | None = None,
        store: Store = "ram",
        encoder: str = "first",
    ) -> Encoded:
        """z_L of the bicubic upsampled image, padded (replicate) to a multiple of 8, by the
        VAE encoder of pass ``encoder`` (first or second)."""
        source = to_tensor(upsampled).to(self.device)
        height, width = source.shape[-2:]
        image = self.pad(source * 2 - 1)
        generator = self.generator(options)
        model = self.vae_for(encoder)
        latents = vae.encode(
            model, image, sample=options.vae_sample, generator=generator, tile=tile, store=store
        )
        return Encoded(latents=latents, source=source, size=(height, width))

    def generator(self, options: UpscaleOptions) -> torch.Generator | None:
        """The noise of one image's --vae-sample: seeded by --seed, else by a fresh seed."""
        if not options.vae_sample:
            return None
        seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
        return torch.Generator(self.device).manual_seed(seed)

    def pad(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` padded (replicate) on the bottom and right to a multiple of 8."""
        height, width = image.shape[-2:]
        pad_h, pad_w = (-height) % self.vae_factor, (-width) % self.vae_factor
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        return image

    @torch.inference_mode()
    def predict(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        variants: tuple[str, ...],
        tiles: TilePlan,
        tile_batch: int = 1,
        timestep: int = 1,
    ) -> dict[str, torch.Tensor]:
        """eps of each UNet variant (``pix``, ``pisa``, ``second``) over the latent tiles
        (float32), the latents taken in the UNet's dtype (fp32 during its redo; a compiled
        UNet's last batch padded: one shape, one compile)."""
        latents = latents.to(self.unet.dtype)
        compiled = getattr(self.unet.forward, "compiled", None) is not None
        return predict_eps(
            self.unet, latents, cond, tiles, variants, tile_batch, timestep, pad=compiled
        )

    @torch.inference_mode()
    def decode(
        self,
        latents: torch.Tensor,
        size: tuple[int, int],
        tile: int | None = None,
        store: Store = "ram",
    ) -> torch.Tensor:
        """The decoded image in [0, 1], cropped to ``size`` (undoing the padding)."""
        image = vae.decode(self.vae, latents, tile=tile, store=store)
        # NCHW whatever the decoder's layout (channels-last in bf16 on a CPU), as a batch's
        # crops are: the colour fix's reductions round by layout (``color.color_fix``)
        image = image[..., : size[0], : size[1]]
        image = image.to(torch.float32, memory_format=torch.contiguous_format)
        return image.mul_(0.5).add_(0.5).clamp_(0, 1)  # in place: this can be a big buffer

    @staticmethod
    def finish(
        decoded: torch.Tensor, source: torch.Tensor, method: str, levels: int = 255
    ) -> torch.Tensor:
        """The 8-bit output of the reference: truncate, colour-fix, (the writer truncates again).
        ``levels`` DEEP_MAX: the same on the 16-bit grid, for 16-bit inputs."""
        return color.color_fix(method, color.quantize(decoded, levels), source)

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
        with timed(timings, prefix + "unet", self.device):
            z_high = self.step(latents.encoded.latents, eps, stage)
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
        options = stage.options
        prefix = f"{stage.name}_" if stage.name else ""
        deep = isinstance(image, DeepImage)
        with timed(timings, prefix + "preprocess"):
            rgb = as_rgb(image)
            plan = self.plan(rgb.size, options, stage.variants, stage.tiling, stage.planner)
            upsampled = upsample_input(rgb, plan.resize)
        with timed(timings, prefix + "text"):
            cond = self.embed(options.prompt)
        with timed(timings, prefix + "encode", self.device):
            encode = partial(self.encode, upsampled, options, encoder=stage.encoder)
            vae = self.vae_for(stage.encoder)
            encoded, plan = self.guard.encode(encode, plan, notes, vae)
        return Latents(plan=plan, cond=cond, encoded=encoded, deep=deep)

    def predict_eps(
        self, latents: Latents, stage: PassPlan, timings: dict[str, float], notes: list[str]
    ) -> dict[str, torch.Tensor]:
        """eps of each of the stage's UNet variants over the latent tiles (retried with
        smaller tiles when memory runs out; ``latents.plan`` follows)."""
        prefix = f"{stage.name}_" if stage.name else ""
        with timed(timings, prefix + "unet", self.device):
            z_low, cond = latents.encoded.latents, latents.cond

            def predict(plan: ImagePlan) -> dict[str, torch.Tensor]:
                tiles, batch = plan.unet, plan.tile_batch
                return self.predict(z_low, cond, plan.variants, tiles, batch, stage.timestep)

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
        with timed(timings, prefix + "decode", self.device):
            decode = partial(self.decode, z_high, latents.encoded.size)
            decoded, latents.plan = self.guard.decode(decode, latents.plan, notes)
        return decoded

    def finish_image(self, decoded: torch.Tensor, latents: Latents, method: str):
        """The finished image of a pass: truncated, colour-fixed against the bicubic input,
        shrunk back for an enlarged small input (a DeepImage for 16-bit inputs)."""
        levels = DEEP_MAX if latents.deep else 255
        fixed = self.finish(decoded, latents.encoded.source, method, levels)
        image = to_deep(fixed) if latents.deep else to_image(fixed)
        return restore_size(image, latents.plan.resize)

    @property
    def unet_calls(self) -> int:
        """UNet calls so far (each carries a batch of tiles and every variant needed)."""
        return self.unet.calls

    def step(
        self, latents: torch.Tensor, eps: dict[str, torch.Tensor], stage: PassPlan
    ) -> torch.Tensor:
        """z_H from z_L and the eps of the stage's variants."""
        if stage.rule == "x0":
            alpha_bar = float(self.scheduler.alphas_cumprod[stage.timestep])  # type: ignore[attr-defined]
            return x0_from_eps(latents, eps[stage.variants[0]], alpha_bar)
        options = stage.options
        return latents - combine_eps(eps, options.lambda_pix, options.lambda_sem)


def _default_passes(steps: int) -> Passes:
    """A pipeline built without ``passes``: PiSA-SR's (the default family)."""
    from pisa_cli.core.families import family_of
    from pisa_cli.core.passes import PassWeights

    return Passes(PassWeights(family_of("")), timesteps=steps)
