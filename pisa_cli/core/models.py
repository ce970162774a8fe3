"""The models of a pipeline and their raw calls: what a stage, a family's own pass and the
batcher run, one model call each.

``Models`` holds the UNet (``models.lora.PisaUNet``), the VAE (and the second pass's VAE
when its encoder differs), the prompt encoder and the scheduler, on one device in one
dtype. Its calls do no planning and no recovery: ``PisaPipeline`` (``core.pipeline``)
composes them into stages under ``recovery``'s guard; ``batching`` calls them on several
images at once; a family with its own pass (``families.hypir_pass``) calls what it needs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pisa_cli.core.latents import Encoded, to_tensor
from pisa_cli.engine import memory, vae
from pisa_cli.engine.denoise import combine_eps, predict_eps, x0_from_eps
from pisa_cli.engine.tiles import TilePlan
from pisa_cli.engine.vae import Store
from pisa_cli.models.lora import PisaUNet
from pisa_cli.models.text import PromptEncoder
from pisa_cli.options import UpscaleOptions

if TYPE_CHECKING:
    from PIL import Image

    from pisa_cli.core.passes import PassPlan


@dataclass(eq=False, repr=False)
class Models:
    """The loaded models, on ``device`` in ``dtype``, and their raw calls."""

    unet: PisaUNet
    vae: torch.nn.Module
    """The VAE: the first pass's encoder, the decoder of every pass."""
    prompts: PromptEncoder
    scheduler: object
    """Only its ``alphas_cumprod`` is read (the x0 rule, HYPIR's step)."""
    device: torch.device
    dtype: torch.dtype
    second_vae: torch.nn.Module | None = None
    """The VAE with the second pass's encoder, when it differs from the first's (the
    decoder is the same module)."""
    vae_factor: int = field(init=False)
    """Image pixels per latent pixel (8 for SD 2.1)."""
    widths: memory.Widths = field(init=False)
    """The models' widths, for the memory estimates of a plan."""

    def __post_init__(self) -> None:
        vae_config = self.vae.config  # type: ignore[union-attr]
        self.vae_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        self.widths = memory.Widths(
            unet=int(self.unet.unet.config.block_out_channels[0]),  # type: ignore[union-attr]
            vae=int(vae_config.block_out_channels[0]),
            vae_factor=self.vae_factor,
        )

    @property
    def steps(self) -> int:
        """The scheduler's number of training timesteps."""
        return len(self.scheduler.alphas_cumprod)  # type: ignore[attr-defined]

    @property
    def unet_calls(self) -> int:
        """UNet calls so far (each carries a batch of tiles and every variant needed)."""
        return self.unet.calls

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

    @torch.inference_mode()
    def encode_many(
        self, upsampled: list[Image.Image], options: UpscaleOptions, encoder: str = "first"
    ) -> tuple[torch.Tensor, list[Encoded]]:
        """z_L of images of one padded size in one encoder call (each padded as ``encode``
        pads, each with its own --vae-sample noise): the batch's and each image's."""
        sources = [to_tensor(image).to(self.device) for image in upsampled]
        batch = torch.cat([self.pad(source * 2 - 1) for source in sources])
        generators = [self.generator(options) for _source in sources]
        model = self.vae_for(encoder)
        z_low = vae.encode(model, batch, sample=options.vae_sample, generator=generators)
        encoded = [
            Encoded(z_low[index : index + 1], source, tuple(source.shape[-2:]))  # type: ignore[arg-type]
            for index, source in enumerate(sources)
        ]
        return z_low, encoded

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

    def step(
        self, latents: torch.Tensor, eps: dict[str, torch.Tensor], stage: PassPlan
    ) -> torch.Tensor:
        """z_H from z_L and the eps of the stage's variants."""
        if stage.rule == "x0":
            alpha_bar = float(self.scheduler.alphas_cumprod[stage.timestep])  # type: ignore[attr-defined]
            return x0_from_eps(latents, eps[stage.variants[0]], alpha_bar)
        options = stage.options
        return latents - combine_eps(eps, options.lambda_pix, options.lambda_sem)

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
