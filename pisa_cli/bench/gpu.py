"""`pisa bench gpu`: one command that proves the CUDA path and measures it.

Checks (bench/gpu_checks.py: ok or FAIL each), then figures on the full-size SD 2.1-base
architecture with random weights, built on the machine itself (nothing is downloaded): a
first-run load from files (peak GPU memory against the weights), 64 images 128->512 (img/s,
stages, MFU against a bf16 matmul measured in the same run, peak memory, time outside the
model stages), adjustable vs default, one 512->2048 image, the 5x5 sweep, image batch 1 vs
auto, and the official PiSA-SR script on the same weights when its code is given.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pisa_cli.bench import Row, machine, measured, scenario
from pisa_cli.bench.gpu_checks import Check, all_checks
from pisa_cli.options import BatchOptions, UpscaleOptions

FOLDER_IMAGES = 64
NO_CUDA = (
    "pisa bench gpu: no CUDA device here (torch.cuda.is_available() is False); "
    "run it on an NVIDIA GPU"
)
LOAD_SLACK = 1 << 30
"""Peak memory of a first-run load may exceed the weights in the compute dtype by this."""


@dataclass
class GpuReport:
    """What `pisa bench gpu` found: the checks, the figures, the machine."""

    checks: list[Check] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if check.ok is False]

    def as_json(self) -> dict:
        return {
            "machine": self.machine,
            "checks": [check.__dict__ | {"result": check.word} for check in self.checks],
            "rows": [row.__dict__ for row in self.rows],
        }


def prove(
    device: torch.device,
    official: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
    figures: bool = True,
) -> GpuReport:
    """Run every check on ``device`` and, with ``figures``, measure it (bf16)."""
    report = GpuReport(machine=_machine(device))
    report.checks = all_checks(device, progress)
    if not figures:
        return report
    with tempfile.TemporaryDirectory(prefix="pisa-gpu-") as folder:
        base, weights = _random_files(Path(folder), progress)
        progress("first-run load")
        check, row = load_figure(device, base, weights)
        report.checks.append(check)
        report.rows.append(row)
        progress("figures")
        report.rows += speed_figures(device)
        progress("official PiSA-SR script")
        report.rows.append(official_figure(official, base, weights, device))
    return report


def _machine(device: torch.device) -> dict[str, str]:
    found = machine()
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
        found["cuda"] = str(torch.version.cuda)
    return found


def _random_files(folder: Path, progress: Callable[[str], None]) -> tuple[Path, Path]:
    from pisa_cli.bench.coldstart import save_official_checkpoint
    from pisa_cli.models.synthetic import save_random_base

    progress("writing the full-size random SD 2.1-base")
    base = save_random_base(folder / "base", "sd21-base", seed=0)
    weights = folder / "pisa_sr.pkl"
    save_official_checkpoint(base, weights)
    return base, weights


def load_figure(device: torch.device, base: Path, weights: Path) -> tuple[Check, Row]:
    """A first-run load (empty cache) from files in bf16: peak memory on ``device`` against
    the weights it ends with."""
    from pisa_cli import load_pipeline

    rows: list[Row] = []
    saved = os.environ.get("PISA_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="pisa-gpu-cache-") as cache:
        os.environ["PISA_CACHE_DIR"] = cache
        try:
            with measured(rows, "gpu-load", "first run, bf16, empty cache", device) as row:
                pipeline = load_pipeline(
                    weights=str(weights), base_model=str(base), device=str(device), dtype="bf16"
                )
        finally:
            if saved is None:
                os.environ.pop("PISA_CACHE_DIR", None)
            else:
                os.environ["PISA_CACHE_DIR"] = saved
    models = (pipeline.models.unet.unet, pipeline.models.vae)
    held = sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values())
    row.figures["weights_gib"] = round(held / 2**30, 2)
    peak = row.peak_bytes or 0
    ok = peak <= held + LOAD_SLACK
    detail = f"peak {peak / 2**30:.2f} GiB, weights {held / 2**30:.2f} GiB (+1 GiB allowed)"
    del pipeline
    return Check("first-run load peak", ok, detail), row


def speed_figures(device: torch.device) -> list[Row]:
    """The figures, bf16, full-size random weights; pipelines shared between scenarios."""
    from pisa_cli.bench import perf, sweep, upscale

    rows: list[Row] = []
    dtype = torch.bfloat16
    with upscale.shared_pipelines():
        rows += folder_figure(device, dtype)
        for run in (perf.adjustable_128, upscale.upscale_large, sweep.sweep_5x5, perf.folder_32):
            rows += run(device, dtype)
    return rows


def folder_figure(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """64 images 128->512, --image-batch auto: img/s, stage times, MFU, peak memory, and
    the GPU's idle time: wall time outside the model stages (reading, preprocessing, colour
    fix, writing not hidden behind the model calls)."""
    from pisa_cli.bench.perf import _measure, _peaks
    from pisa_cli.bench.upscale import random_sd21_pipeline, run_folder

    rows: list[Row] = []
    peaks = {"bf16": _peaks(device)["bf16"]}
    pipeline = random_sd21_pipeline(device, dtype)
    options = UpscaleOptions()
    run_folder([], "warm-up", "", pipeline, [128] * 4, options, BatchOptions())
    sizes = [128] * FOLDER_IMAGES
    case = f"{FOLDER_IMAGES} x 128->512 bf16, image batch auto"
    row = _measure(rows, "gpu-folder", case, pipeline, sizes, options, peaks, BatchOptions())
    row.figures["images_per_s"] = round(FOLDER_IMAGES / row.seconds, 2)
    row.figures["peak_bf16_tflops"] = round(peaks["bf16"] / 1e12, 1)
    # stage times of a shared call are shared evenly among its images: their sum is the
    # time in model calls; the rest of the wall time the GPU waited for the host
    model = sum(float(row.figures.get(stage, 0.0)) for stage in ("encode", "unet", "decode"))
    row.figures["gpu_idle_s"] = round(max(0.0, row.seconds - model), 2)
    row.figures["gpu_idle_share"] = round(max(0.0, 1 - model / row.seconds), 3)
    return rows


def official_figure(official: Path | None, base: Path, weights: Path, device) -> Row:
    """The official PiSA-SR script (csslc/PiSA-SR) on the same weights, images and device:
    ``PiSASR_eval`` imported from ``official`` (a checkout carried to the machine), timed
    on the images of folder_figure. Skipped with the reason when it cannot run."""
    row = Row("official", "PiSA-SR script, 128->512 bf16", 0.0)
    if official is None:
        row.figures["skipped"] = "no --official DIR (a checkout of csslc/PiSA-SR)"
        return row
    try:
        row.seconds, count = _run_official(official, base, weights, device)
        row.figures["images_per_s"] = round(count / row.seconds, 2)
    except Exception as error:  # its pinned stack may not run here: say why
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        row.figures["skipped"] = f"{type(error).__name__}: {reason}"
    return row


def _run_official(official: Path, base: Path, weights: Path, device) -> tuple[float, int]:
    from argparse import Namespace

    from pisa_cli.bench.upscale import noise_photo

    sys.path.insert(0, str(official.resolve()))
    try:
        from pisasr import PiSASR_eval  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(official.resolve()))
    args = Namespace(
        pretrained_model_path=str(base),
        pretrained_path=str(weights),
        process_size=512,
        upscale=4,
        align_method="adain",
        lambda_pix=1.0,
        lambda_sem=1.0,
        vae_decoder_tiled_size=224,
        vae_encoder_tiled_size=1024,
        latent_tiled_size=96,
        latent_tiled_overlap=32,
        mixed_precision="bf16",
        default=True,
        seed=42,
        device=str(device),
    )
    model = PiSASR_eval(args)
    model.set_eval()
    images = [noise_photo(128, seed) for seed in range(FOLDER_IMAGES)]

    def one(image) -> None:  # as its test_pisasr.py: PIL resize x4, [-1, 1], one call
        lr = np.asarray(image.resize((512, 512)), dtype=np.float32) / 255
        c_t = torch.from_numpy(lr).permute(2, 0, 1)[None].to(device) * 2 - 1
        with torch.no_grad():
            model(args.default, c_t, prompt="")

    one(images[0])  # warm-up
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for image in images:
        one(image)
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, len(images)


@scenario("gpu")
def gpu_scenario(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """The GPU proof: device checks (ok/FAIL) and full-size figures; needs CUDA (see README
    "GPU proof"); `pisa bench gpu --json gpu.json`."""
    return prove(device).rows
