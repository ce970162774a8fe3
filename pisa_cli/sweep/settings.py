"""What a sweep makes of each image, the same for every image of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pisa_cli.errors import OptionsError
from pisa_cli.options import DEFAULT_MAX_PIXELS, ModelOptions, UpscaleOptions
from pisa_cli.sweep.grid import LambdaGrid
from pisa_cli.sweep.sheet import SheetOptions


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep makes of each image; the same for every image of a run."""

    grid: LambdaGrid
    options: UpscaleOptions
    """Everything of ``pisa upscale`` but the lambdas, which come from the grid."""
    images: bool = True
    """Write every grid point's image (``pix0.50_sem1.30.png``)."""
    viewer: bool = False
    """Write ``viewer.html``."""
    gt_dir: Path | None = None
    """Folder of ground-truth images, matched to inputs by file stem."""
    sheet: SheetOptions = field(default_factory=SheetOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    """Recorded in sweep.json."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Inputs with more pixels, or enlarged to more for the model, fail before decoding."""
    image_batch: int | None = None
    """Grid points per decoder call (--image-batch; None: auto). Images do not depend on it."""

    def points(self) -> list:
        """Every point decoded: the grid's, and with the viewer its three basis points."""
        from pisa_cli.sweep.core import BASIS

        return [*self.grid.points, *(BASIS.values() if self.viewer else ())]

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise OptionsError(f"--max-pixels {self.max_pixels} must be at least 1")
