"""The PiSA-SR pipeline: one image in, one image out, every stage of REFERENCE sections 3-4.

``PisaPipeline.upscale`` takes an RGB PIL image and returns the upscaled one (``loading``
makes the pipeline). The stage methods (encode, predict, decode, finish) are what the
folder runner and the sweep share.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pisa_cli.core.planning import ImagePlan, plan_image
from pisa_cli.core.recovery import StageGuard
from pisa_cli.engine import color, memory, vae
from pisa_cli.engine.denoise import combine_eps, predict_eps, variants_needed, x0_from_eps
from pisa_cli.engine.tiles import TilePlan
from pisa_cli.errors import OptionsError
from pisa_cli.imaging.deep import DEEP_MAX, DeepImage
from pisa_cli.imaging.resize import ResizePlan, restore_size, upsample_input
from pisa_cli.models.adapters import FAMILY_NAMES, OMGSR, PISA, resolve_timestep
from pisa_cli.models.device import free_memory
from pisa_cli.models.lora import PisaUNet
from pisa_cli.models.text import PromptEncoder
from pisa_cli.options import SecondPassOptions, UpscaleOptions

log = logging.getLogger(__name__)

TIMESTEP = 1
"""PiSA-SR's fixed UNet timestep."""


@dataclass
class Encoded:
    """The latent of one upsampled image and what is needed to undo the padding."""

    latents: torch.Tensor
    """z_L, (1, 4, h, w), scaled by the VAE's scaling factor."""
    source: torch.Tensor
    """The upsampled input in [0, 1], (1, 3, H, W), unpadded: the colour-fix reference."""
    size: tuple[int, int]
    """(H, W) of the unpadded image."""


@dataclass(frozen=True)
class Stage:
    """One pass of the model over an image."""

    name: str
    """"" for the PiSA-SR pass, "second" for the x2 pass (prefix of its timings)."""
    variants: tuple[str, ...]
    """UNet weight sets the pass needs."""
    timestep: int
    rule: str
    """pisa: z_H = z_L - eps (lambdas combined); x0: the DDPM one-step formula."""
    options: UpscaleOptions
    """Scale, prompt, colour fix, tiles and lambdas of this pass."""
    tiling: str = "stablesr"
    """The UNet tile grid: stablesr (PiSA-SR's script) or omgsr (OMGSR-S's script)."""
    encoder: str = "first"
    """Whose VAE encoder encodes: the first pass's or the second pass's."""


@dataclass
class UpscaleResult:
    """An upscaled image and how it was made."""

    image: Image.Image
    plan: ImagePlan
    """The plan as run (after any out-of-memory retry)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: preprocess, text, encode, unet, decode, color."""
    notes: list[str] = field(default_factory=list)
    """What had to be changed on the way (out-of-memory retries, fp32 redos)."""
    second_plan: ImagePlan | None = None
    """The plan of the x2 pass, when there was one."""

    @property
    def resize(self) -> ResizePlan:
        return self.plan.resize

    @property
    def tiles(self) -> TilePlan:
        return self.plan.unet


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
        self.guard = StageGuard(self.vae, dtype)
        self.family = PISA
        """The first pass's model family: pisa-sr, or omgsr (an adapter folder)."""
        self.first_timestep: int | None = None
        """The timestep an OMGSR-style first pass's folder records, if it does."""
        self.first_source = ""
        self.second_family = ""
        """The second pass's LoRA layout: lora (UNet only) or omgsr (an adapter folder)."""
        self.second_timestep: int | None = None
        """The timestep stored in the second-pass LoRA file, if it has one."""
        self.second_source = ""
        self.second_vae: torch.nn.Module | None = None
        """The VAE with the second pass's encoder, when it differs from the first's (the
        decoder is the same module)."""

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
        tiling: str = "stablesr",
    ) -> ImagePlan:
        """The plan for an input of ``size`` (width, height) in the memory free right now."""
        free = free_memory(self.device)
        itemsize = self.dtype.itemsize
        return plan_image(size, options, self.widths, itemsize, free, variants, tiling)

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
        store: str = "ram",
        encoder: str = "first",
    ) -> Encoded:
        """z_L of the bicubic upsampled image, padded (replicate) to a multiple of 8, by the
        VAE encoder of pass ``encoder`` (first or second)."""
        source = to_tensor(upsampled).to(self.device)
        height, width = source.shape[-2:]
        pad_h, pad_w = (-height) % self.vae_factor, (-width) % self.vae_factor
        image = source * 2 - 1
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        generator = None
        if options.vae_sample:
            seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
            generator = torch.Generator(self.device).manual_seed(seed)
        model = self.vae_for(encoder)
        latents = vae.encode(
            model, image, sample=options.vae_sample, generator=generator, tile=tile, store=store
        )
        return Encoded(latents=latents, source=source, size=(height, width))

    @torch.inference_mode()
    def predict(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        variants: tuple[str, ...],
        tiles: TilePlan,
        tile_batch: int = 1,
        timestep: int = TIMESTEP,
    ) -> dict[str, torch.Tensor]:
        """eps of each UNet variant (``pix``, ``pisa``, ``second``) over the latent tiles."""
        return predict_eps(self.unet, latents, cond, tiles, variants, tile_batch, timestep)

    @torch.inference_mode()
    def decode(
        self,
        latents: torch.Tensor,
        size: tuple[int, int],
        tile: int | None = None,
        store: str = "ram",
    ) -> torch.Tensor:
        """The decoded image in [0, 1], cropped to ``size`` (undoing the padding)."""
        image = vae.decode(self.vae, latents, tile=tile, store=store)
        image = image[..., : size[0], : size[1]].float()
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
        smaller tiles when memory runs out and in fp32 when a low-precision VAE pass gives
        inf or NaN. A DeepImage (16-bit input) goes through in float and comes back as one."""
        options = options or UpscaleOptions()
        timings: dict[str, float] = {}
        notes: list[str] = []
        plans = []
        for stage in self.stages(options):
            image, plan = self.run_stage(image, stage, timings, notes)
            plans.append(plan)
        second = plans[1] if len(plans) > 1 else None
        return UpscaleResult(image, plans[0], timings, notes, second)

    def stages(self, options: UpscaleOptions) -> list[Stage]:
        """The passes ``options`` ask for: the first pass at ``scale`` (PiSA-SR, or an
        OMGSR-style folder at its timestep), then the optional x2 pass."""
        first = self._first_stage(options)
        second = options.second_pass
        if second.kind == "none":
            return [first]
        plain = replace(options, scale=2, timestep=None, second_pass=SecondPassOptions())
        if second.kind == "pisa":
            if self.family != PISA:
                raise OptionsError(
                    "--second-pass pisa needs PiSA-SR weights; with an adapter folder use "
                    "--second-pass tudsr --second-pass-weights DIR"
                )
            return [first, Stage("second", first.variants, TIMESTEP, "pisa", plain)]
        if "second" not in self.unet.variants:
            raise OptionsError(
                "this pipeline was loaded without a second-pass LoRA; load it with "
                "options that name --second-pass-weights"
            )
        tudsr = replace(plain, prompt=second.prompt)
        if self.second_family == OMGSR:
            timestep, _ = self.second_pass_timestep(second.timestep)
            return [first, Stage("second", ("second",), timestep, "x0", tudsr, OMGSR, "second")]
        timestep = second.timestep if second.timestep is not None else self.second_timestep
        if timestep is None:
            raise OptionsError(
                f"{self.second_source}: the LoRA file does not say its timestep; pass "
                "--second-pass-timestep T"
            )
        steps = self.timesteps
        if not 0 <= timestep < steps:
            raise OptionsError(f"--second-pass-timestep {timestep} must be from 0 to {steps - 1}")
        return [first, Stage("second", ("second",), timestep, "x0", tudsr, encoder="second")]

    def _first_stage(self, options: UpscaleOptions) -> Stage:
        if self.family == PISA:
            if options.timestep is not None:
                raise OptionsError(
                    f"--timestep {options.timestep}: PiSA-SR runs at t = 1; --timestep is for "
                    "OMGSR-style adapter folders"
                )
            lambdas = (options.lambda_pix, options.lambda_sem)
            return Stage("", variants_needed(*lambdas), TIMESTEP, "pisa", options)
        timestep, _ = self.first_pass_timestep(options.timestep)
        return Stage("", ("first",), timestep, "x0", options, OMGSR)

    @property
    def timesteps(self) -> int:
        """The scheduler's number of training timesteps (valid timesteps: 0 to this - 1)."""
        return len(self.scheduler.alphas_cumprod)  # type: ignore[attr-defined]

    def first_pass_timestep(self, flag: int | None) -> tuple[int, str]:
        """(timestep, where it came from) of an OMGSR-style first pass; WeightsError when
        it is outside the scheduler's range."""
        return resolve_timestep(flag, self.first_timestep, self.timesteps, self.first_source)

    def second_pass_timestep(self, flag: int | None) -> tuple[int, str]:
        """The same for an OMGSR-style second pass (the flag: --second-pass-timestep)."""
        what = "--second-pass-timestep"
        recorded, source = self.second_timestep, self.second_source
        return resolve_timestep(flag, recorded, self.timesteps, source, what)

    def describe(self, options: UpscaleOptions) -> list[str]:
        """What runs, for the log: each pass's family, weights and timestep."""
        lines = []
        if self.family == OMGSR:
            timestep, origin = self.first_pass_timestep(options.timestep)
            lines.append(
                f"{FAMILY_NAMES[OMGSR]} {self.first_source}, timestep {timestep} ({origin})"
            )
        else:
            lines.append(f"{FAMILY_NAMES[PISA]}, timestep {TIMESTEP}")
        if options.second_pass.kind == "tudsr" and self.second_family == OMGSR:
            timestep, origin = self.second_pass_timestep(options.second_pass.timestep)
            lines.append(
                f"second pass: {FAMILY_NAMES[OMGSR]} {self.second_source}, timestep {timestep} "
                f"({origin})"
            )
        return lines

    def run_stage(
        self, image: Image.Image, stage: Stage, timings: dict[str, float], notes: list[str]
    ) -> tuple[Image.Image, ImagePlan]:
        """One pass of ``stage`` over ``image``: the finished image and the plan as run."""
        options = stage.options
        prefix = f"{stage.name}_" if stage.name else ""
        deep = isinstance(image, DeepImage)
        with _timed(timings, prefix + "preprocess"):
            rgb = image if deep or image.mode == "RGB" else image.convert("RGB")
            plan = self.plan(rgb.size, options, stage.variants, stage.tiling)
            upsampled = upsample_input(rgb, plan.resize)
        with _timed(timings, prefix + "text"):
            cond = self.embed(options.prompt)
        with _timed(timings, prefix + "encode", self.device):
            encoded, plan = self.guard.encode(self, upsampled, options, plan, notes, stage.encoder)
        with _timed(timings, prefix + "unet", self.device):
            eps, plan = self.guard.predict(self, encoded.latents, cond, plan, notes, stage.timestep)
            latents = self.step(encoded.latents, eps, stage)
            del eps
        with _timed(timings, prefix + "decode", self.device):
            decoded, plan = self.guard.decode(self, latents, encoded.size, plan, notes)
        with _timed(timings, prefix + "color"):
            levels = DEEP_MAX if deep else 255
            fixed = self.finish(decoded, encoded.source, options.color_fix, levels)
            result = restore_size(to_deep(fixed) if deep else to_image(fixed), plan.resize)
        return result, plan

    def step(
        self, latents: torch.Tensor, eps: dict[str, torch.Tensor], stage: Stage
    ) -> torch.Tensor:
        """z_H from z_L and the eps of the stage's variants."""
        if stage.rule == "x0":
            alpha_bar = float(self.scheduler.alphas_cumprod[stage.timestep])  # type: ignore[attr-defined]
            return x0_from_eps(latents, eps[stage.variants[0]], alpha_bar)
        options = stage.options
        return latents - combine_eps(eps, options.lambda_pix, options.lambda_sem)


@contextmanager
def _timed(timings: dict[str, float], stage: str, device: torch.device | None = None) -> Iterator:
    start = time.perf_counter()
    yield
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def to_tensor(image: Image.Image | DeepImage) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1] of an 8-bit RGB image or a DeepImage."""
    if isinstance(image, DeepImage):
        return torch.from_numpy(image.to_array()).permute(2, 0, 1)[None].contiguous()
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255


def to_image(tensor: torch.Tensor) -> Image.Image:
    """8-bit RGB image of a (1, 3, H, W) tensor in [0, 1], truncating like the reference."""
    array = (tensor[0].clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def to_deep(tensor: torch.Tensor) -> DeepImage:
    """DeepImage of a (1, 3, H, W) tensor in [0, 1] (16-bit inputs keep their precision)."""
    return DeepImage.from_array(tensor[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy())
