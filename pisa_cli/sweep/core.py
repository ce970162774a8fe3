"""The sweep of one image: the encoder once, the UNet's two passes once, then any number of
grid points, each decoded exactly.

REFERENCE section 3: every z_H is an affine combination of z_L, z_L - eps_pix and
z_L - eps_pisa, so once eps_pix and eps_pisa are known, a grid point costs one VAE decode
and a colour fix. The stages are PisaPipeline's, under the same StageGuard as
``pisa upscale`` (out-of-memory retries, fp32 redo), so a point's image is what
``pisa upscale`` gives for its lambdas.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from pisa_cli.core.batching import decode_points
from pisa_cli.core.latents import Encoded, Latents, as_rgb, timed
from pisa_cli.core.loading import merged_variant
from pisa_cli.core.pipeline import PisaPipeline
from pisa_cli.core.planning import ImagePlan
from pisa_cli.engine.denoise import combine_eps
from pisa_cli.imaging.deep import DeepImage
from pisa_cli.imaging.resize import plan_resize
from pisa_cli.options import UpscaleOptions
from pisa_cli.sweep.grid import GridPoint, plan_options

log = logging.getLogger(__name__)

VARIANTS = ("pix", "pisa")

BASIS = {"low": GridPoint(0.0, 0.0), "pix": GridPoint(1.0, 0.0), "pisa": GridPoint(1.0, 1.0)}
"""The three basis latents of REFERENCE section 8 as grid points: (0, 0) is z_L,
(1, 0) is z_L - eps_pix, (1, 1) is z_L - eps_pisa."""


def blend_weights(pix: float, sem: float) -> tuple[float, float, float]:
    """Weights of the low, pix and pisa basis for (lambda_pix, lambda_sem) (REFERENCE 3)."""
    return 1.0 - pix, pix - sem, sem


def blend_basis(basis: dict[str, np.ndarray], pix: float, sem: float) -> np.ndarray:
    """The pixel-space blend of the three finished basis images (H, W, 3 uint8), rounded to
    8 bits: what the viewer shows between grid points (REFERENCE section 8)."""
    weights = blend_weights(pix, sem)
    total = np.zeros(basis["low"].shape, dtype=np.float64)
    for name, weight in zip(BASIS, weights, strict=True):
        total += weight * basis[name].astype(np.float64)
    return np.clip(np.rint(total), 0, 255).astype(np.uint8)


@dataclass
class Prepared:
    """An image after the encoder and the UNet: all that its grid points need."""

    image: Image.Image | DeepImage
    """The colour the model sees: 8-bit RGB, or a DeepImage of a 16-bit input."""
    latents: Latents
    """Its plan as run so far, prompt embedding and z_L (the pipeline's stages)."""
    eps: dict[str, torch.Tensor]
    """eps_pix and eps_pisa, aggregated over the latent tiles."""
    unet_calls: int = 0
    """UNet calls the two passes took (one per tile batch, both variants in each call)."""
    decodes: int = 0
    """Grid points decoded so far."""
    decode_batch: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    merged_eps: torch.Tensor | None = None
    """eps_pisa from the PiSA-merged weights, for points `pisa upscale` runs on them
    (``Sweeper.merged``), computed when the first such point comes."""

    second_pass: bool = False
    """Each point's image also went through the x2 second pass (lambdas: the point's)."""
    output_size: tuple[int, int] = (0, 0)
    """Each point's image size (twice the x4 result's with a second pass)."""

    @property
    def encoded(self) -> Encoded:
        return self.latents.encoded

    @property
    def plan(self) -> ImagePlan:
        """The plan as run so far (after any out-of-memory retry)."""
        return self.latents.plan

    def bicubic(self) -> Image.Image:
        """The input enlarged to the output size with PIL's bicubic filter (the "before"),
        8-bit RGB."""
        enlarged = self.image.resize(self.output_size, Image.Resampling.BICUBIC)
        if isinstance(enlarged, DeepImage):
            return Image.fromarray(np.rint(enlarged.to_array() * 255).astype(np.uint8))
        return enlarged


def at(options: UpscaleOptions, point: GridPoint) -> UpscaleOptions:
    """``options`` with the lambdas of ``point``: what `pisa upscale` runs for it."""
    return replace(options, lambda_pix=point.pix, lambda_sem=point.sem)


def needs_merged(pipeline: PisaPipeline, options: UpscaleOptions, points) -> bool:
    """Whether some of ``points`` need a pipeline with the PiSA weights merged, as `pisa
    upscale` loads for equal lambdas, where the sweep's (pixel weights merged) reaches them
    through the side path: in bf16 and fp16 the two round apart (a merged weight rounds
    once; on the tiny random model a point moved by up to 122 levels), in fp32 they agree
    to float noise."""
    if pipeline.models.dtype == torch.float32:
        return False
    merged = pipeline.models.unet.merged
    return any(
        merged_variant(at(options, point), pipeline.passes.family) == "pisa" != merged
        for point in points
    )


class Sweeper:
    """Runs the shared stages of a sweep and decodes grid points, for one pipeline."""

    def __init__(
        self,
        pipeline: PisaPipeline,
        options: UpscaleOptions,
        image_batch: int | None = None,
        merged: PisaPipeline | None = None,
    ):
        self.pipeline = pipeline
        self.options = plan_options(options)
        self.second_pass = options.second_pass.kind != "none"
        self.image_batch = image_batch
        """--image-batch: grid points per decoder call (None: auto, as `pisa upscale`)."""
        self.merged = merged if merged is not pipeline else None
        """The same model with the PiSA weights merged (``needs_merged``): the eps of points
        with equal lambdas come from it, as in `pisa upscale`; None: from ``pipeline``."""

    def prepare(self, image: Image.Image | DeepImage) -> Prepared:
        """Encode ``image`` (8-bit RGB, or a DeepImage: its points come out as DeepImages,
        as in `pisa upscale`) and run both UNet passes (the whole cost shared by all
        points), through the pipeline's own stages."""
        pipe, timings, notes = self.pipeline, {}, []
        rgb = as_rgb(image)
        stage = replace(pipe.stages(self.options)[0], variants=VARIANTS)
        latents = pipe.prepare_latents(rgb, stage, timings, notes)
        calls = pipe.models.unet_calls
        eps = pipe.predict_eps(latents, stage, timings, notes)
        return Prepared(
            image=rgb,
            latents=latents,
            eps=eps,
            unet_calls=pipe.models.unet_calls - calls,
            decode_batch=self.decode_batch_size(latents.plan),
            timings=timings,
            notes=notes,
            second_pass=self.second_pass,
            output_size=self.output_size(rgb.size),
        )

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size of each point's image for an input of ``size``."""
        options = self.options
        size = plan_resize(size, options.scale, options.process_size).output_size
        if self.second_pass:
            size = plan_resize(size, 2, options.process_size).output_size
        return size

    def decode_batch_size(self, plan: ImagePlan) -> int:
        """Points per decoder call: the image batch of `pisa upscale` (``--image-batch``;
        auto: as many as fit on an accelerator, 1 on a CPU); 1 for a banded decoder."""
        if plan.decoder_tile is not None:
            return 1
        return self.pipeline.batcher.size(plan, self.image_batch)

    def latents(self, prepared: Prepared, point: GridPoint) -> torch.Tensor:
        """z_H of ``point``: the same weights and arithmetic as ``pisa upscale``."""
        eps = prepared.eps
        if self.on_merged(point):
            eps = {"pisa": self.merged_eps(prepared)}
        return prepared.encoded.latents - combine_eps(eps, point.pix, point.sem)

    def on_merged(self, point: GridPoint) -> bool:
        """Whether ``point`` takes its eps from ``merged`` (as `pisa upscale` would)."""
        if self.merged is None:
            return False
        return merged_variant(at(self.options, point), self.pipeline.passes.family) == "pisa"

    def merged_eps(self, prepared: Prepared) -> torch.Tensor:
        """eps_pisa of the PiSA-merged pipeline, planned as `pisa upscale` plans its pass
        (one UNet variant), once per image."""
        if prepared.merged_eps is None:
            pipe = self.merged
            assert pipe is not None
            stage = pipe.stages(at(self.options, BASIS["pisa"]))[0]
            size = prepared.image.size
            plan = pipe.plan(size, stage.options, stage.variants, stage.tiling, stage.planner)
            latents = replace(prepared.latents, plan=plan)
            calls = pipe.models.unet_calls
            eps = pipe.predict_eps(latents, stage, prepared.timings, prepared.notes)
            prepared.unet_calls += pipe.models.unet_calls - calls
            prepared.merged_eps = eps["pisa"]
        return prepared.merged_eps

    def images(
        self, prepared: Prepared, points: Iterable[GridPoint]
    ) -> Iterator[tuple[GridPoint, Image.Image | DeepImage]]:
        """Each point's finished colour (decoded exactly, colour-fixed; 8-bit RGB, or a
        DeepImage for a 16-bit input), in order."""
        pipe, pending = self.pipeline, list(points)
        if any(self.on_merged(point) for point in pending):
            self.merged_eps(prepared)  # a UNet pass: timed as one, not as decoding
        while pending:
            chunk, pending = pending[: prepared.decode_batch], pending[prepared.decode_batch :]
            with timed(prepared.timings, "decode", pipe.models.device):
                z_high = torch.cat([self.latents(prepared, point) for point in chunk])
                decoded, held = decode_points(pipe, z_high, prepared.latents, prepared.notes)
                del z_high
            prepared.decode_batch = min(prepared.decode_batch, held)
            for point, image in zip(chunk, decoded, strict=True):
                with timed(prepared.timings, "color"):
                    result = pipe.finish_image(image, prepared.latents, self.options.color_fix)
                prepared.decodes += 1
                yield point, self.second(prepared, point, result)

    def second(self, prepared: Prepared, point: GridPoint, image: Image.Image) -> Image.Image:
        """``image`` (the point's x4 result) through the x2 second pass, if there is one:
        the stages of ``pisa upscale`` with the point's lambdas, so the image is the same."""
        if not self.second_pass:
            return image
        options = at(self.options, point)
        pipe = self.merged if self.on_merged(point) else self.pipeline
        for stage in pipe.stages(options)[1:]:  # on the model `pisa upscale` loads for them
            image, _ = pipe.run_stage(image, stage, prepared.timings, prepared.notes)
        return image
