"""What passes between the stages of a pass (``Encoded``, ``Latents``) and comes out of one
(``UpscaleResult``), the conversions between images and tensors, and the stage timer:
shared by the pipeline and the batcher."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pisa_cli.core.planning import ImagePlan
from pisa_cli.engine.tiles import TilePlan
from pisa_cli.imaging.deep import DeepImage
from pisa_cli.imaging.resize import ResizePlan
from pisa_cli.models.device import synchronize


@dataclass
class Encoded:
    """The latent of one upsampled image and what is needed to undo the padding."""

    latents: torch.Tensor
    """z_L, (1, 4, h, w), scaled by the VAE's scaling factor."""
    source: torch.Tensor
    """The upsampled input in [0, 1], (1, 3, H, W), unpadded: the colour-fix reference."""
    size: tuple[int, int]
    """(H, W) of the unpadded image."""


@dataclass
class Latents:
    """An image after the first stages of a pass: its plan (as run so far), the prompt
    embedding and z_L; what the UNet and the decoder need."""

    plan: ImagePlan
    cond: torch.Tensor
    encoded: Encoded
    deep: bool = False
    """A 16-bit input: finished on the 16-bit grid."""


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
    batch: int = 1
    """Images that shared the first pass's model calls (``core.batching``), itself included."""

    @property
    def resize(self) -> ResizePlan:
        return self.plan.resize

    @property
    def tiles(self) -> TilePlan:
        return self.plan.unet


@contextmanager
def timed(timings: dict[str, float], stage: str, device: torch.device | None = None) -> Iterator:
    start = time.perf_counter()
    yield
    if device is not None:
        synchronize(device)  # the queued work belongs to this stage (CUDA, MPS)
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def as_rgb(image: Image.Image | DeepImage) -> Image.Image | DeepImage:
    """The image the model sees: 8-bit RGB, or the DeepImage of a 16-bit input as it is."""
    return image if isinstance(image, DeepImage) or image.mode == "RGB" else image.convert("RGB")


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
