"""pisa-cli: batch image upscaling with PiSA-SR (one-step diffusion super-resolution).

Public API::

    from PIL import Image
    from pisa_cli import load_pipeline, UpscaleOptions

    pipe = load_pipeline(weights="pisa_sr.pkl")
    big = pipe.upscale(Image.open("photo.jpg"), UpscaleOptions(lambda_sem=0.8))

Importing this package is cheap: torch and the models load on first use of the API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pisa_cli.options import ModelOptions, TileOptions, UpscaleOptions

__version__ = "0.1.0"
__all__ = ["ModelOptions", "TileOptions", "UpscaleOptions", "__version__", "load_pipeline"]

if TYPE_CHECKING:
    from pisa_cli.core.loading import load_pipeline


def __getattr__(name: str) -> Any:
    if name == "load_pipeline":
        from pisa_cli.core.loading import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'pisa_cli' has no attribute {name!r}")
