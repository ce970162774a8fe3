"""Tiled VAE scenarios: exactness against the untiled VAE, and memory that stays flat."""

from __future__ import annotations

import torch

from pisa_cli.bench import Row, measured, scenario
from pisa_cli.engine.vae import decode, encode
from pisa_cli.models.synthetic import build_random_base


def _vae(dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    vae = build_random_base("sd21-base", seed=0, text=False, unet=False).vae
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


@scenario("vae-exact")
def vae_exact(
    device: torch.device, dtype: torch.dtype, size: int = 1024, tile: int = 64
) -> list[Row]:
    """Tiled vs untiled at ``size`` px: decoder (tile in latent px) and encoder mean."""
    rows: list[Row] = []
    vae = _vae(dtype, device)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, size // 8, size // 8, generator=generator).to(device)
    image = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(device)
    with torch.inference_mode():
        with measured(rows, "vae-exact", f"decode {size}px untiled", device):
            whole = decode(vae, latent)
        with measured(rows, "vae-exact", f"decode {size}px tile {tile} disk", device) as row:
            tiled = decode(vae, latent, tile=tile, store="disk")
            row.figures["max_abs_diff"] = float(
                (tiled.float().cpu() - whole.float().cpu()).abs().max()
            )
        with measured(rows, "vae-exact", f"encode {size}px untiled", device):
            whole = encode(vae, image)
        with measured(rows, "vae-exact", f"encode {size}px tile {tile * 8} disk", device) as row:
            tiled = encode(vae, image, tile=tile * 8, store="disk")
            diff = (tiled.float().cpu() - whole.float().cpu()).abs().max()
            row.figures["max_abs_diff_mean"] = float(diff / 0.18215)
    return rows


@scenario("vae-memory")
def vae_memory(
    device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), tile: int = 64
) -> list[Row]:
    """Peak memory of the tiled decoder and encoder at growing sizes, same tile, disk store:
    the peak minus the output (or input) buffer should not grow with the image."""
    rows: list[Row] = []
    vae = _vae(dtype, device)
    itemsize = dtype.itemsize
    for size in sizes:
        latent = torch.randn(1, 4, size // 8, size // 8).to(device)
        image = (torch.rand(1, 3, size, size) * 2 - 1).to(device, dtype)
        buffer = 3 * size * size * itemsize
        with torch.inference_mode():
            with measured(rows, "vae-memory", f"decode {size}px tile {tile} disk", device) as row:
                out = decode(vae, latent, tile=tile, store="disk")
            del out
            row.figures["output_gib"] = buffer / 2**30
            row.figures["peak_minus_output_gib"] = (row.peak_bytes or 0) / 2**30 - buffer / 2**30
            case = f"encode {size}px tile {tile * 8} disk"
            with measured(rows, "vae-memory", case, device) as row:
                encode(vae, image, tile=tile * 8, store="disk")
            row.figures["input_gib"] = buffer / 2**30
    return rows
