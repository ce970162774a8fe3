"""The PIL resizing around the model, as the reference does it (REFERENCE section 4).

1. An input whose short side is below ``process_size / scale`` is first enlarged (bicubic)
   so that it is not, and the result is shrunk back (bicubic) at the end.
2. The (possibly enlarged) input is upsampled by ``scale`` with PIL's bicubic filter: this
   image is the network input and the colour reference.
3. The reference then resizes to a multiple of 8 with Lanczos, which changes the output
   size. We do the same for enlarged inputs, whose result is resized to its final size
   anyway; otherwise the pipeline pads and crops instead, so that the output is exactly
   ``scale`` times the input.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class ResizePlan:
    """Sizes of one image through the pipeline, (width, height) as PIL gives them."""

    input_size: tuple[int, int]
    """The input as read."""
    work_size: tuple[int, int]
    """The input after the small-input enlargement (equal to input_size if none)."""
    scale: int
    """The upscale factor."""
    multiple: int = 8
    """The model needs sizes that are a multiple of this (the VAE's downsampling factor)."""

    @property
    def enlarged(self) -> bool:
        return self.work_size != self.input_size

    @property
    def upsampled_size(self) -> tuple[int, int]:
        """Size of the model input and of the model output before any shrinking back."""
        return self.work_size[0] * self.scale, self.work_size[1] * self.scale

    @property
    def model_size(self) -> tuple[int, int]:
        """Size of the image the model sees: enlarged inputs are squeezed to a multiple of 8
        (as the reference does); others keep their size and are padded by the pipeline."""
        width, height = self.upsampled_size
        if not self.enlarged:
            return width, height
        return max(self.multiple, width - width % self.multiple), max(
            self.multiple, height - height % self.multiple
        )

    @property
    def output_size(self) -> tuple[int, int]:
        return self.input_size[0] * self.scale, self.input_size[1] * self.scale


def plan_resize(
    size: tuple[int, int], scale: int, process_size: int, multiple: int = 8
) -> ResizePlan:
    """The reference's small-input rule: short side below process_size // scale -> enlarge."""
    width, height = size
    least = process_size // scale
    if width < least or height < least:
        factor = least / min(width, height)
        work = (int(factor * width), int(factor * height))
    else:
        work = (width, height)
    return ResizePlan(input_size=(width, height), work_size=work, scale=scale, multiple=multiple)


def upsample_input(image: Image.Image, plan: ResizePlan) -> Image.Image:
    """The bicubic upsampled input: the model input and the colour-fix source."""
    if plan.enlarged:
        image = image.resize(plan.work_size, Image.Resampling.BICUBIC)
    image = image.resize(plan.upsampled_size, Image.Resampling.BICUBIC)
    if plan.model_size != plan.upsampled_size:
        image = image.resize(plan.model_size, Image.Resampling.LANCZOS)
    return image


def restore_size(image: Image.Image, plan: ResizePlan) -> Image.Image:
    """Shrink an enlarged small input's result back to exactly ``scale`` times the input."""
    if image.size == plan.output_size:
        return image
    return image.resize(plan.output_size, Image.Resampling.BICUBIC)
