"""Several images through one pass together: images whose model input has the same shape
share the VAE encoder, UNet and decoder calls (``--image-batch``).

A batch changes how fast, never what comes out:
- each image comes out as it would alone: bit for bit where the kernels keep a sample's
  arithmetic apart from its batch-mates' (on a CPU in bf16 and fp16 the engine runs the
  samples one by one for that reason), within float noise (at most one 8-bit level) in fp32,
  where a kernel's blocking follows the batch size;
- an image that fails never fails the others: a batch that raises is run again image by
  image, so only the guilty one fails, with its own error;
- out of memory halves the batch (and the batches after it); a batch of one has the single
  image's retries, a smaller tile batch, then a smaller tile (``recovery``).

Images that tile the VAE (large ones) always run alone, as their banded VAE works on one
image; images that tile the UNet share its calls: the tile batch counts tiles of any image.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from pisa_cli.core.latents import Latents, UpscaleResult, as_rgb, timed
from pisa_cli.core.models import Models
from pisa_cli.core.passes import PassPlan
from pisa_cli.core.planning import ImagePlan
from pisa_cli.core.recovery import Failure, NotFinite, finite, retry_halving
from pisa_cli.engine import memory
from pisa_cli.imaging.deep import DeepImage
from pisa_cli.imaging.resize import upsample_input
from pisa_cli.options import UpscaleOptions

log = logging.getLogger(__name__)

ANY_FAILURE = frozenset(Failure)
"""What a batch of images recovers from: any failure runs its images alone."""
NOT_ERRORS = frozenset({Failure.MEMORY, Failure.NOT_FINITE})
"""What a batch of sweep points recovers from: another error is the image's."""

AUTO_IMAGE_BATCH = 16
"""Images per call at most with ``--image-batch auto`` on an accelerator."""
CPU_IMAGE_BATCH = 1
"""``auto`` on a CPU. Measured with `pisa bench folder-32` (SD 2.1-base, 128->512, fp32,
2 cores, AMX CPU): 4 images per call ran at the speed of 1 (the UNet gains 9 %, the VAE
nothing, and the look-ahead holds images back), and in bf16 a CPU runs samples one by one
anyway (``engine.vae.one_by_one``)."""


@dataclass
class Member:
    """One image of a batch as it goes through the passes."""

    image: Any
    """The input of the pass in progress (an RGB image or a DeepImage), then the result."""
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plans: list[ImagePlan] = field(default_factory=list)
    batch: int = 1
    """Images that shared the first pass's model calls with this one (itself included)."""
    error: Exception | None = None

    def result(self) -> UpscaleResult | Exception:
        if self.error is not None:
            return self.error
        second = self.plans[1] if len(self.plans) > 1 else None
        return UpscaleResult(
            self.image, self.plans[0], self.timings, self.notes, second, self.batch
        )


@runtime_checkable
class BatchedPipeline(Protocol):
    """What the batcher asks of a pipeline (a ``PisaPipeline``; this module is below it):
    its stages, and its models for the raw calls it shares between images."""

    models: Models
    batch_state: BatchState

    def stages(self, options: UpscaleOptions) -> list[PassPlan]: ...
    def plan(
        self,
        size: tuple[int, int],
        options: UpscaleOptions,
        variants: tuple[str, ...] | None = None,
        tiling: str = "stablesr",
        planner: Any = None,
    ) -> ImagePlan: ...
    def run_stage(
        self, image: Any, stage: PassPlan, timings: dict[str, float], notes: list[str]
    ) -> tuple[Any, ImagePlan]: ...
    def decode_latents(
        self, z_high: torch.Tensor, latents: Latents, timings: dict[str, float], notes: list[str]
    ) -> torch.Tensor: ...
    def finish_image(self, decoded: torch.Tensor, latents: Latents, method: str) -> Any: ...


@dataclass
class BatchState:
    """What a pipeline's batches learned, kept between its calls (held by the pipeline;
    a ``Batcher`` lives for one call)."""

    limits: dict[tuple[int, int], int] = field(default_factory=dict)
    """The most images per call for a model input size, since a batch of that size ran
    out of memory (a second pass's larger images do not cap the first pass's)."""
    warned: bool = False
    """Whether a batch that failed (not for memory) was said."""

    def shrink(self, plan: ImagePlan, failed: int, unit: str, stage: str = "") -> tuple[str, int]:
        """After a call of ``failed`` images (or points) of ``plan`` ran out of memory (the
        memory released): half that many per call for images of its size from now on; the
        note that says so (logged), and that half."""
        half = max(1, failed // 2)
        self.limits[plan.model_size] = min(self.limits.get(plan.model_size, half), half)
        note = f"{stage}out of memory with {failed} {unit} per call; {half} from now on"
        log.warning(note)
        return note, half


class Batcher:
    """Groups images for a pipeline and runs groups through its passes, for one call: what
    outlives it is in ``state`` (the pipeline's)."""

    def __init__(self, pipeline: BatchedPipeline, state: BatchState | None = None):
        self.pipeline = pipeline
        self.state = state if state is not None else BatchState()

    @property
    def limits(self) -> dict[tuple[int, int], int]:
        """``BatchState.limits``."""
        return self.state.limits

    def plan(self, image: Any, stage: PassPlan) -> ImagePlan:
        return self.pipeline.plan(
            image.size, stage.options, stage.variants, stage.tiling, stage.planner
        )

    @staticmethod
    def key(plan: ImagePlan, stage: PassPlan) -> Hashable | None:
        """Equal for images that can share the calls of a pass; None: the image runs alone
        (its VAE runs in bands)."""
        if plan.encoder_tile is not None or plan.decoder_tile is not None:
            return None
        return (
            plan.model_size,
            plan.variants,
            plan.unet,
            plan.tile_batch,
            stage.encoder,
            stage.timestep,
        )

    def size(self, plan: ImagePlan, requested: int | None) -> int:
        """Images per call for images of ``plan``: ``requested``, or auto (AUTO_IMAGE_BATCH
        on an accelerator, CPU_IMAGE_BATCH on a CPU); never more than the free memory holds
        by the plan's estimate, nor than an out-of-memory error left for this size."""
        if requested is not None:
            size = requested
        elif self.pipeline.models.device.type == "cpu":
            size = CPU_IMAGE_BATCH
        else:
            size = AUTO_IMAGE_BATCH
        fit = int(plan.free_bytes * memory.SAFETY // max(1, plan.peak_bytes))
        fit = min(fit, plan.untiled_batch_limit(self.pipeline.models.widths))  # 2^31 elements
        size = min(size, fit, self.limits.get(plan.model_size, size))
        return max(1, size)

    def batching(
        self, image: Any, options: UpscaleOptions, requested: int | None
    ) -> tuple[Hashable | None, int]:
        """(key, size): images with equal keys may share calls, ``size`` at a time; a key
        of None: the image runs alone."""
        stage = self.pipeline.stages(options)[0]
        plan = self.plan(image, stage)
        key = self.key(plan, stage)
        return (None, 1) if key is None else (key, self.size(plan, requested))

    # --- running ----------------------------------------------------------------------
    def upscale(
        self, images: Sequence[Any], options: UpscaleOptions, requested: int | None = None
    ) -> list[UpscaleResult | Exception]:
        """Each image upscaled (or the error that stopped it), in order: the images of each
        pass grouped by key, ``size`` at a time."""
        members = [Member(image) for image in images]
        for index, stage in enumerate(self.pipeline.stages(options)):
            groups: dict[Hashable, list[tuple[Member, ImagePlan]]] = {}
            for member in members:
                if member.error is not None:
                    continue
                try:
                    plan = self.plan(member.image, stage)
                except Exception as error:
                    member.error = _let_go(error)
                    continue
                key = self.key(plan, stage)
                alone = id(member)  # an int: never equal to a key (a tuple)
                groups.setdefault(alone if key is None else key, []).append((member, plan))
            for group in groups.values():
                self.run(group, stage, index == 0, requested)
        return [member.result() for member in members]

    def run(
        self,
        group: list[tuple[Member, ImagePlan]],
        stage: PassPlan,
        first: bool,
        requested: int | None,
    ) -> None:
        """One pass over ``group``, ``size`` images at a time: together; on out of memory
        in halves (and so on for the rest); on any other error each image alone."""

        def halve(chunk: list[tuple[Member, ImagePlan]]) -> list[tuple[Member, ImagePlan]] | None:
            note, half = self.state.shrink(chunk[0][1], len(chunk), "images")
            for member, _plan in chunk:
                member.notes.append(note)
            return chunk[:half] if half > 1 else None  # one image: alone, with its retries

        while group:
            size = self.size(group[0][1], requested) if len(group) > 1 else 1
            if size == 1:
                self.alone(group[0][0], stage)
                group = group[1:]
                continue
            outcome, chunk = retry_halving(
                lambda chunk: self.together(chunk, stage, first),
                group[:size],
                halve,
                ANY_FAILURE,
                self.warn,
            )
            group = group[len(chunk) :]
            if isinstance(outcome, Failure):
                for member, _plan in chunk:
                    self.alone(member, stage)

    def warn(self, error: Exception, chunk: list[tuple[Member, ImagePlan]]) -> None:
        """Said once per run: a batch failed (not for lack of memory) and its images run
        alone."""
        if not self.state.warned:
            log.warning(
                "a batch of %d images failed (%s); its images run alone (said once per run)",
                len(chunk),
                str(error),  # the text: a record kept by a handler keeps no tensors
            )
            self.state.warned = True

    def alone(self, member: Member, stage: PassPlan) -> None:
        """One image through the pass, with the single image's recoveries."""
        try:
            member.image, plan = self.pipeline.run_stage(
                member.image, stage, member.timings, member.notes
            )
        except Exception as error:
            member.error = _let_go(error)
        else:
            member.plans.append(plan)

    def together(self, group: list[tuple[Member, ImagePlan]], stage: PassPlan, first: bool) -> None:
        """One pass over images of one key in shared calls. Nothing is kept of a batch that
        raises: the members are as they were."""
        pipe, models, options = self.pipeline, self.pipeline.models, stage.options
        prefix = f"{stage.name}_" if stage.name else ""
        plans = [plan for _member, plan in group]
        timings: dict[str, float] = {}
        with timed(timings, prefix + "preprocess"):
            inputs = [as_rgb(member.image) for member, _plan in group]
            upsampled = [
                upsample_input(rgb, plan.resize) for rgb, plan in zip(inputs, plans, strict=True)
            ]
        with timed(timings, prefix + "text"):
            cond = models.embed(options.prompt)
        with timed(timings, prefix + "encode", models.device):
            z_low, encoded = models.encode_many(upsampled, options, stage.encoder)
            if not finite(z_low):
                raise NotFinite("VAE encoder")
        plan = plans[0]
        with timed(timings, prefix + "unet", models.device):
            per_call = plan.tile_batch if plan.unet.tiled else len(group)
            eps = models.predict(z_low, cond, plan.variants, plan.unet, per_call, stage.timestep)
            if not finite(*eps.values()):
                raise NotFinite("UNet")
            z_high = models.step(z_low, eps, stage)
            del eps
        with timed(timings, prefix + "decode", models.device):
            decoded = decode_together(models, z_high, [one.size for one in encoded])
        with timed(timings, prefix + "color"):
            images = []
            for index, (member, plan) in enumerate(group):
                deep = isinstance(member.image, DeepImage)
                latents = Latents(plan, cond, encoded[index], deep)
                images.append(pipe.finish_image(decoded[index], latents, options.color_fix))
        for (member, plan), image in zip(group, images, strict=True):
            member.image = image
            member.plans.append(plan)
            member.batch = len(group) if first else member.batch
            for name, seconds in timings.items():  # a shared call's time, shared evenly
                member.timings[name] = member.timings.get(name, 0.0) + seconds / len(group)


def _let_go(error: Exception) -> Exception:
    """``error`` kept without its tracebacks (nor those of its cause and context): they
    hold the failed attempt's frames, and with them its tensors. The traceback goes to the
    debug log first."""
    log.debug("an image failed in its pass", exc_info=error)
    seen: set[int] = set()
    links: list[BaseException | None] = [error]
    while links:
        link = links.pop()
        if link is not None and id(link) not in seen:
            seen.add(id(link))
            link.__traceback__ = None
            links += [link.__cause__, link.__context__]
    return error


@torch.inference_mode()
def decode_together(
    models: Models, z_high: torch.Tensor, sizes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """The (1, 3, H, W) images in [0, 1] of ``z_high`` from one decoder call, each cropped
    to its (H, W) in ``sizes`` (raises NotFinite on inf or NaN)."""
    height, width = z_high.shape[-2:]
    factor = models.vae_factor
    decoded = models.decode(z_high, (height * factor, width * factor))
    if not finite(decoded):
        raise NotFinite("VAE decoder")
    return [decoded[i : i + 1, :, :h, :w].contiguous() for i, (h, w) in enumerate(sizes)]


def decode_points(
    pipe: BatchedPipeline, z_high: torch.Tensor, latents: Latents, notes: list[str]
) -> tuple[list[torch.Tensor], int]:
    """The decoded images (cropped, in [0, 1]) of several latents of one image (a sweep's
    grid points), like ``Batcher.run``: together; in halves when memory runs out (and so
    on for the image's size); one by one with the single image's recoveries when a low
    precision overflows; (images, the fewest latents that went through one call)."""
    state, plan = pipe.batch_state, latents.plan

    def halve(chunk: torch.Tensor) -> torch.Tensor | None:
        note, half = state.shrink(plan, chunk.shape[0], "points", "VAE decoder ")
        notes.append(note)
        return chunk[:half] if half > 1 else None  # one latent: alone, with its retries

    def together(chunk: torch.Tensor) -> list[torch.Tensor]:
        return decode_together(pipe.models, chunk, [latents.encoded.size] * chunk.shape[0])

    images: list[torch.Tensor] = []
    held, rest = z_high.shape[0], z_high
    while rest.shape[0]:
        size = min(rest.shape[0], state.limits.get(plan.model_size, rest.shape[0]))
        chunk, outcome = rest[:size], None
        if size > 1:
            outcome, chunk = retry_halving(together, chunk, halve, NOT_ERRORS)
        rest = rest[chunk.shape[0] :]
        if size > 1 and not isinstance(outcome, Failure):
            images += outcome
            held = min(held, chunk.shape[0])
        else:  # one latent, or a batch that failed: each alone, with its own recoveries
            images += [pipe.decode_latents(z, latents, {}, notes) for z in chunk.split(1)]
            held = 1
    return images, held
