"""The sweep's HTML viewer: one file, opened from disk, that blends the lambda plane live.

It holds the three finished basis images (REFERENCE section 8: the decodes of z_L,
z_L - eps_pix and z_L - eps_pisa, i.e. the grid points (0, 0), (1, 0) and (1, 1)) and the
bicubic input, embedded as PNG data URIs, and blends the basis pixels on a canvas with the
affine weights of the sliders. Grid points show their exactly decoded image: the PNG next
to the viewer when the sweep wrote one, else embedded. No server, no network (a
Content-Security-Policy forbids any fetch).
"""

from __future__ import annotations

import base64
import io
import json
from importlib import resources

from PIL import Image

from pisa_cli.sweep.core import BASIS
from pisa_cli.sweep.grid import GridPoint, LambdaGrid

PLACEHOLDER = "/*PISA_DATA*/"
DEFAULT_START = GridPoint(1.0, 1.0)
"""Where the sliders start when the grid allows: the paper's default lambdas."""


def png_data_uri(image: Image.Image) -> str:
    """``data:image/png;base64,...`` of ``image`` (lossless, no colour profile)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def embeddable_json(payload: object) -> str:
    """JSON that can sit inside a ``<script>`` element whatever its strings hold: ``<``,
    ``>`` and ``&`` are written as ``\\u003c``... (the same JSON strings), so no file name
    can end the element or open a comment (``<!--<script>``) that swallows the page."""
    text = json.dumps(payload, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def slider_range(values: tuple[float, ...]) -> list[float]:
    """An axis' slider span: the grid's, widened to hold the basis values 0 and 1."""
    return [min(0.0, values[0]), max(1.0, values[-1])]


def build_viewer(
    title: str,
    settings: str,
    grid: LambdaGrid,
    basis: dict[str, Image.Image],
    bicubic: Image.Image,
    exact: dict[GridPoint, str],
) -> str:
    """The viewer's HTML. ``basis`` maps low, pix, pisa to finished images; ``exact`` maps
    grid points to a file name next to the viewer or a data URI."""
    if set(basis) != set(BASIS):
        raise ValueError(f"the viewer needs the basis images {sorted(BASIS)}")
    pix_range, sem_range = slider_range(grid.pix), slider_range(grid.sem)
    start = DEFAULT_START
    if not (
        pix_range[0] <= start.pix <= pix_range[1] and sem_range[0] <= start.sem <= sem_range[1]
    ):
        start = grid.points[0]
    payload = {
        "title": title,
        "settings": settings,
        "size": list(bicubic.size),
        "basis": {name: png_data_uri(image) for name, image in basis.items()},
        "bicubic": png_data_uri(bicubic),
        "grid": {"pix": list(grid.pix), "sem": list(grid.sem)},
        "range": {"pix": pix_range, "sem": sem_range},
        "start": [start.pix, start.sem],
        "exact": {point.key: source for point, source in exact.items()},
        "files": {
            point.key: source for point, source in exact.items() if not source.startswith("data:")
        },
    }
    text = embeddable_json(payload)
    template = resources.files("pisa_cli.sweep").joinpath("viewer.html").read_text("utf-8")
    return template.replace(PLACEHOLDER, text)
