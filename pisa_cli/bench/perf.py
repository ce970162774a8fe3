"""Performance scenarios: model-FLOP utilisation (MFU) of the whole pipeline.

MFU = useful FLOPs / wall time / peak. Useful FLOPs are those of the untiled encoder, UNet
pass(es) and decoder for the image, counted once with torch's FlopCounterMode on meta
tensors (free) without the attention score and mix products, which torch's fused CPU
kernels do not report either; tile overlap and recomputation count as waste. The peak is a
large matmul in the same run on the same device, in bf16 and in fp32.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache

import torch

from pisa_cli.bench import Row, scenario
from pisa_cli.bench.upscale import random_sd21_pipeline, run_folder
from pisa_cli.models.device import synchronize
from pisa_cli.models.synthetic import config_dir
from pisa_cli.options import BatchOptions, UpscaleOptions

_ATTENTION_OPS = ("bmm", "scaled_dot_product")


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 4096) -> float:
    """FLOP/s of the best of a few large square matmuls."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    torch.mm(a, b)
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


@lru_cache(maxsize=8)
def _meta_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source = config_dir("sd21-base")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            json.loads((source / "unet/config.json").read_text())
        )
        vae = AutoencoderKL.from_config(json.loads((source / "vae/config.json").read_text()))
    return unet.eval(), vae.eval()


def _count(function) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    ops = counter.get_flop_counts()["Global"]
    return float(sum(v for k, v in ops.items() if not any(a in str(k) for a in _ATTENTION_OPS)))


@lru_cache(maxsize=64)
def useful_flops(width: int, height: int, unet_passes: int) -> dict[str, float]:
    """FLOPs of the encoder, UNet (per pass) and decoder of SD 2.1-base for one image of
    ``width`` x ``height`` pixels (the model input), untiled."""
    unet, vae = _meta_models()
    meta = torch.device("meta")
    image = torch.empty(1, 3, height, width, device=meta)
    latent = torch.empty(1, 4, height // 8, width // 8, device=meta)
    cond = torch.empty(1, 77, 1024, device=meta)
    step = torch.tensor([1], device=meta)
    with torch.inference_mode():
        encoder = _count(lambda: vae.encode(image).latent_dist.mean)
        one_pass = _count(lambda: unet(latent, step, encoder_hidden_states=cond).sample)
        decoder = _count(lambda: vae.decode(latent).sample)
    return {"encoder": encoder, "unet": one_pass * unet_passes, "decoder": decoder}


def add_mfu(row: Row, flops: float, peaks: dict[str, float]) -> None:
    row.figures["useful_gflop"] = round(flops / 1e9, 1)
    row.figures["gflop_per_s"] = round(flops / row.seconds / 1e9, 1)
    for name, peak in peaks.items():
        row.figures[f"mfu_{name}"] = round(flops / row.seconds / peak, 3)


def _measure(
    rows: list[Row],
    name: str,
    case: str,
    pipeline,
    sizes: list[int],
    options,
    peaks,
    batch: BatchOptions | None = None,
) -> Row:
    row = run_folder(rows, name, case, pipeline, sizes, options, batch)
    total = 0.0
    for size in sizes:
        plan = pipeline.plan((size, size), options)
        width, height = plan.model_size
        total += sum(useful_flops(width, height, len(plan.variants)).values())
    add_mfu(row, total, peaks)
    return row


def _peaks(device: torch.device) -> dict[str, float]:
    return {"bf16": matmul_peak(torch.bfloat16, device), "fp32": matmul_peak(torch.float32, device)}


@scenario("default-128")
def default_128(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """128->512 in the default mode (one UNet pass), end to end: read to write, 3 images
    after one warm-up image."""
    rows: list[Row] = []
    peaks = _peaks(device)
    pipeline = random_sd21_pipeline(device, dtype)
    options = UpscaleOptions()
    run_folder([], "warm-up", "", pipeline, [128], options)
    _measure(rows, "default-128", f"3 x 128->512 {dtype}", pipeline, [128] * 3, options, peaks)
    rows[-1].figures["peak_bf16_gflops"] = round(peaks["bf16"] / 1e9)
    return rows


@scenario("adjustable-128")
def adjustable_128(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """128->512 with lambdas (1, 0.5): both UNet passes in one batch, vs the default mode."""
    rows: list[Row] = []
    peaks = _peaks(device)
    pipeline = random_sd21_pipeline(device, dtype, merged="pix")
    default, adjustable = UpscaleOptions(), UpscaleOptions(lambda_sem=0.5)
    run_folder([], "warm-up", "", pipeline, [128], adjustable)
    first = _measure(rows, "adjustable-128", "default (1, 1)", pipeline, [128] * 2, default, peaks)
    second = _measure(
        rows, "adjustable-128", "adjustable (1, 0.5)", pipeline, [128] * 2, adjustable, peaks
    )
    second.figures["time_vs_default"] = round(second.seconds / first.seconds, 3)
    return rows


@scenario("folder-8")
def folder_8(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """A folder of 8 images 128->512 through the runner: throughput and MFU."""
    rows: list[Row] = []
    peaks = _peaks(device)
    pipeline = random_sd21_pipeline(device, dtype)
    options = UpscaleOptions()
    run_folder([], "warm-up", "", pipeline, [128], options)
    row = _measure(rows, "folder-8", f"8 x 128->512 {dtype}", pipeline, [128] * 8, options, peaks)
    row.figures["images_per_s"] = round(8 / row.seconds, 3)
    return rows


FOLDER_IMAGES = 32


@scenario("folder-32")
def folder_32(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """32 images 128->512 through the runner, one per model call (--image-batch 1) and
    --image-batch auto: images/s, MFU and peak memory of each. Where auto is 1 (a CPU),
    also 4 per call, the figure auto was chosen from."""
    from pisa_cli.core.batching import Batcher

    rows: list[Row] = []
    peaks = _peaks(device)
    pipeline = random_sd21_pipeline(device, dtype)
    options = UpscaleOptions()
    auto = Batcher(pipeline).size(pipeline.plan((128, 128), options), None)
    cases: dict[str, int | None] = {"--image-batch 1": 1, f"--image-batch auto ({auto})": None}
    if auto == 1:
        cases["--image-batch 4"] = 4
    run_folder([], "warm-up", "", pipeline, [128] * 2, options, BatchOptions(image_batch=2))
    sizes = [128] * FOLDER_IMAGES
    for case, size in cases.items():
        batch = BatchOptions(image_batch=size)
        row = _measure(rows, "folder-32", f"{case} {dtype}", pipeline, sizes, options, peaks, batch)
        row.figures["images_per_s"] = round(FOLDER_IMAGES / row.seconds, 3)
    base = rows[0].seconds
    for row in rows[1:]:
        row.figures["speedup_vs_1"] = round(base / row.seconds, 3)
    return rows


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) / 255).square().mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()


@scenario("precision")
def precision(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """The same 128->512 image in fp32 and in the chosen precision: time ratio and PSNR."""
    import numpy as np
    from PIL import Image

    rows: list[Row] = []
    outputs, plain, seconds = {}, {}, {}
    for case in (torch.float32, dtype):
        pipeline = random_sd21_pipeline(device, case)
        options = UpscaleOptions()
        run_folder([], "warm-up", "", pipeline, [128], options)
        image = Image.open(_sample_path(128))
        start = time.perf_counter()
        result = pipeline.upscale(image, options)
        seconds[case] = time.perf_counter() - start
        outputs[case] = torch.from_numpy(np.asarray(result).copy())
        # Random weights decode to a low-contrast image that the colour fix stretches to the
        # input's contrast, and any rounding difference with it: also compare without.
        result = pipeline.upscale(image, UpscaleOptions(color_fix="none"))
        plain[case] = torch.from_numpy(np.asarray(result).copy())
        row = Row("precision", f"128->512 {case}", seconds[case])
        rows.append(row)
        del pipeline
    figures = rows[-1].figures
    figures["speedup_vs_fp32"] = round(seconds[torch.float32] / seconds[dtype], 2)
    figures["psnr_vs_fp32_db"] = round(_psnr(outputs[dtype], outputs[torch.float32]), 2)
    figures["psnr_no_color_fix_db"] = round(_psnr(plain[dtype], plain[torch.float32]), 2)
    return rows


def _sample_path(size: int):
    import tempfile
    from pathlib import Path

    from pisa_cli.bench.upscale import noise_photo

    path = Path(tempfile.gettempdir()) / f"pisa-bench-sample-{size}.png"
    if not path.exists():
        noise_photo(size).save(path)
    return path
