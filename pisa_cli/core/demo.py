"""`pisa doctor --demo DIR`: a tiny random model, its weights and a few sample images left
in a folder, with the exact `pisa upscale` and `pisa sweep` lines that run on them, so a
newcomer sees the tool work before downloading 5 GB.

The model is the tests' tiny SD-2.1-shaped one (models/synthetic.py): random weights, the
real module names and file formats (a diffusers folder in safetensors, PiSA-SR's LoRAs in
our safetensors format). Its outputs are noise-like: it shows the tool, not the method.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from pisa_cli.errors import OptionsError

BASE, WEIGHTS, IMAGES = "tiny-sd21", "pisa_sr.safetensors", "images"
UPSCALED, SWEEPS = "upscaled", "sweeps"
PROCESS_SIZE = 64
"""Small inputs are enlarged to this / scale first: 64 keeps the tiny model's work small."""
SWEEP_GRID = "pix=0.5,1 sem=0,0.5,1"


@dataclass(frozen=True)
class Demo:
    """What ``write_demo`` left and the lines that run on it."""

    folder: Path
    files: tuple[Path, ...]
    commands: tuple[str, ...]


def write_demo(folder: Path) -> Demo:
    """Write the demo into ``folder`` (new or empty; OptionsError otherwise, nothing
    written) and return the commands to run on it."""
    from pisa_cli.models.checkpoint import save_safetensors
    from pisa_cli.models.synthetic import build_random_base, random_checkpoint, save_random_base

    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OptionsError(f"--demo {folder}: exists and is not an empty folder; name a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    base = save_random_base(folder / BASE, "tiny", seed=0)
    unet = build_random_base("tiny", seed=0, text=False).unet
    weights = folder / WEIGHTS
    save_safetensors(random_checkpoint(unet, seed=1), weights)  # type: ignore[arg-type]
    images = _write_images(folder / IMAGES)
    model = ["--base-model", str(base), "--weights", str(weights)]
    model += ["--process-size", str(PROCESS_SIZE)]
    upscale = ["pisa", "upscale", str(folder / IMAGES), "-o", str(folder / UPSCALED), *model]
    sweep = ["pisa", "sweep", str(images[0]), "-o", str(folder / SWEEPS), *model]
    sweep += ["--lambda-grid", SWEEP_GRID, "--viewer"]
    commands = (shlex.join(upscale), shlex.join(sweep))
    return Demo(folder, (base, weights, *images), commands)


def _write_images(folder: Path) -> list[Path]:
    """Three small sample images of one size: colour, transparent and grey (each mode is
    kept in its output)."""
    from PIL import Image, ImageDraw

    folder.mkdir()
    size = (32, 24)
    ramp = Image.linear_gradient("L")
    rgb = Image.merge("RGB", [ramp.rotate(angle).resize(size) for angle in (0, 90, 180)])
    draw = ImageDraw.Draw(rgb)
    draw.ellipse((4, 4, 18, 18), fill=(230, 180, 40))
    draw.rectangle((17, 7, 29, 20), outline=(20, 60, 200), width=2)
    rgba = rgb.rotate(180).convert("RGBA")
    rgba.putalpha(Image.radial_gradient("L").resize(size).point(lambda v: 255 - v))
    grey = Image.effect_noise(size, 40).convert("L")
    ImageDraw.Draw(grey).ellipse((8, 4, 24, 20), fill=200)
    paths = []
    for name, image in (("shapes.png", rgb), ("transparent.png", rgba), ("grey.png", grey)):
        image.save(folder / name)
        paths.append(folder / name)
    return paths
