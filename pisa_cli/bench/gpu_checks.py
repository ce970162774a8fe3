"""The checks of `pisa bench gpu`: each takes the device under test and says ok or not.

Every check runs the same code on any device: the test suite runs them with ``device`` the
CPU against the CPU (tests/test_bench_gpu.py), so the first GPU run is never their first
run. Tiny random models (configs shipped in the package) keep them fast; the out-of-memory
check is the one that wants the full-size model on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pisa_cli.bench.upscale import noise_photo
from pisa_cli.core.pipeline import PisaPipeline
from pisa_cli.options import SecondPassOptions, TileOptions, UpscaleOptions

log = logging.getLogger(__name__)

PARITY_LEVELS = 2
"""Largest difference, in 8-bit levels, between an output on the device and on the CPU in
fp32."""
OOM_LEVELS = 1
"""Largest difference between a run that ran out of memory (and halved) and one that did not."""
_SIZE, _PROCESS = 24, 64  # tiny images: 24 -> 96 px (process size 64), latents of 12


@dataclass
class Check:
    """One line of the proof: ok, FAIL, or skipped (``ok`` None) and why."""

    name: str
    ok: bool | None
    detail: str = ""

    @property
    def word(self) -> str:
        return "skip" if self.ok is None else "ok" if self.ok else "FAIL"


def tiny_pipeline(
    device: torch.device, dtype: torch.dtype = torch.float32, kind: str = "pisa"
) -> PisaPipeline:
    """The tiny random pipeline: PiSA-SR (``pisa``), with a second-pass LoRA (``second``),
    or an OMGSR-style folder as its first pass (``omgsr``)."""
    from pisa_cli.core.random import random_pipeline

    if kind == "second":
        return random_pipeline("tiny", device, dtype, merged="second", second_rank=4)
    return random_pipeline("tiny", device, dtype, family="omgsr" if kind == "omgsr" else "")


SECOND = SecondPassOptions(kind="tudsr", weights="(random)")
_TILED_VAE = TileOptions(vae_encoder_tile=64, vae_decoder_tile=8)
PARITY_CASES: dict[str, tuple[str, UpscaleOptions]] = {
    "default": ("pisa", UpscaleOptions(process_size=_PROCESS)),
    "adjustable (1, 0.5)": ("pisa", UpscaleOptions(process_size=_PROCESS, lambda_sem=0.5)),
    "latent tiles": (
        "pisa",
        UpscaleOptions(process_size=_PROCESS, tiles=TileOptions(latent_tile=8, latent_overlap=2)),
    ),
    "second pass": ("second", UpscaleOptions(process_size=_PROCESS, second_pass=SECOND)),
    "OMGSR folder": ("omgsr", UpscaleOptions(process_size=_PROCESS)),
}
for _fix in ("adain", "wavelet", "none"):
    PARITY_CASES[f"tiled VAE, {_fix}"] = (
        "pisa",
        UpscaleOptions(process_size=_PROCESS, color_fix=_fix, tiles=_TILED_VAE),
    )
IMAGE_BATCH = 4


def _array(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _worst(ours: list, theirs: list) -> int:
    return max(int(np.abs(_array(a) - _array(b)).max()) for a, b in zip(ours, theirs, strict=True))


def parity_checks(device: torch.device, reference: torch.device | None = None) -> list[Check]:
    """Tiny-model outputs on ``device`` in fp32 against ``reference`` (the CPU) in fp32,
    for every mode, and an image batch of 4 against the images one by one."""
    reference = reference or torch.device("cpu")
    with exact_float32():
        return _parity(device, reference)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """fp32 as on a CPU: no TF32 in cuBLAS or cuDNN (on by default for convolutions; the
    random decoder stretches its rounding to many levels)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _parity(device: torch.device, reference: torch.device) -> list[Check]:
    images = [noise_photo(_SIZE, seed) for seed in range(IMAGE_BATCH)]
    pipelines: dict[tuple[str, str], PisaPipeline] = {}

    def pipeline(kind: str, where: torch.device) -> PisaPipeline:
        key = (kind, str(where))
        if key not in pipelines:
            pipelines[key] = tiny_pipeline(where, torch.float32, kind)
        return pipelines[key]

    checks = []
    for name, (kind, options) in PARITY_CASES.items():
        ours = pipeline(kind, device).upscale(images[0], options)
        theirs = pipeline(kind, reference).upscale(images[0], options)
        worst = _worst([ours], [theirs])
        checks.append(Check(f"parity: {name}", worst <= PARITY_LEVELS, f"max diff {worst}/255"))
    options = UpscaleOptions(process_size=_PROCESS)
    results = [
        pipeline("pisa", where).upscale_many(images, options, IMAGE_BATCH)
        for where in (device, reference)
    ]
    failed = [r for r in results[0] + results[1] if isinstance(r, Exception)]
    if failed:
        return [*checks, Check("parity: image batch 4", False, f"{failed[0]!r}"[:200])]
    worst = _worst([r.image for r in results[0]], [r.image for r in results[1]])
    sizes = sorted({r.batch for r in results[0]})
    detail = f"max diff {worst}/255, images per call {sizes}"
    checks.append(Check("parity: image batch 4", worst <= PARITY_LEVELS, detail))
    return checks


def low_precision_checks(device: torch.device) -> list[Check]:
    """bf16 and fp16 on ``device``: finite outputs without an fp32 redo, close to fp32's."""
    image = noise_photo(_SIZE)
    options = UpscaleOptions(process_size=_PROCESS, color_fix="none")
    with exact_float32():
        plain = _array(tiny_pipeline(device, torch.float32).upscale(image, options))
    checks = []
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        try:
            result = tiny_pipeline(device, dtype).upscale_with_info(image, options)
        except Exception as error:  # a kernel missing in this dtype on this device
            checks.append(Check(f"{name} finite", False, f"{type(error).__name__}: {error}"[:200]))
            continue
        redone = [note for note in result.notes if "inf/NaN" in note]
        diff = float(np.abs(_array(result.image) - plain).mean())
        detail = f"mean diff vs fp32 {diff:.2f}/255" + (f"; {redone[0]}" if redone else "")
        checks.append(Check(f"{name} finite", not redone, detail))
    return checks


def redo_check(device: torch.device) -> Check:
    """An fp16 decoder forced to overflow (its first convolution scaled by 1e5: its weights
    stay finite in fp16, about 2e4 at most, its activations do not; the group norms after
    it undo the scale in fp32) is redone in fp32 with a note. (At 1e6 the fp16 weights
    themselves were inf, and the fp32 redo rightly failed as damaged weights.)"""
    image = noise_photo(_SIZE)
    options = UpscaleOptions(process_size=_PROCESS)
    pipeline = tiny_pipeline(device, torch.float16)
    with torch.no_grad():
        pipeline.models.vae.decoder.conv_in.weight.mul_(1e5)
        pipeline.models.vae.decoder.conv_in.bias.mul_(1e5)
    try:
        result = pipeline.upscale_with_info(image, options)
    except Exception as error:
        return Check("fp16 overflow redone in fp32", False, f"{type(error).__name__}: {error}")
    redone = [note for note in result.notes if "redone in fp32" in note]
    ok = bool(redone) and pipeline.models.vae.dtype == torch.float16  # back in fp16 after the redo
    return Check("fp16 overflow redone in fp32", ok, (redone or ["no redo"])[0])


def compile_check(device: torch.device) -> Check:
    """--compile on and off give the same image (within PARITY_LEVELS, no colour fix: see
    oom_check), on ``device``."""
    image = noise_photo(_SIZE)
    options = UpscaleOptions(process_size=_PROCESS, color_fix="none")
    pipeline = tiny_pipeline(device, torch.float32)
    with exact_float32():
        eager = pipeline.upscale(image, options)
        pipeline.models.compile()
        compiled = pipeline.upscale(image, options)
    worst = _worst([compiled], [eager])
    fell_back = getattr(pipeline.models.unet.forward, "compiled", None) is None
    detail = f"max diff {worst}/255" + ("; fell back to eager" if fell_back else "")
    return Check("--compile on vs off", worst <= PARITY_LEVELS and not fell_back, detail)


Limit = Callable[[PisaPipeline, int], Callable[[], None]]
"""Caps the memory a pipeline may use at ``bytes`` above what it holds; returns the undo."""


def oom_check(
    device: torch.device,
    architecture: str = "sd21-base",
    size: int = 512,
    limit: Limit | None = None,
    options: UpscaleOptions | None = None,
) -> Check:
    """A ``size`` -> 4x image in fp32 with memory capped below what it used uncapped: it
    runs out of memory, halves, and gives the uncapped image within OOM_LEVELS. On CUDA the
    cap is torch.cuda.set_per_process_memory_fraction (a real out-of-memory error);
    elsewhere ``limit`` (the test's stand-in allocator) sets one."""
    limit = limit or (cuda_limit if device.type == "cuda" else None)
    if limit is None:
        return Check("out of memory halves", None, f"no memory cap on {device.type}")
    with exact_float32():
        # no colour fix: adain stretches random weights' low-contrast output, and with it
        # every rounding difference between tile batches of two sizes
        options = options or UpscaleOptions(color_fix="none")
        return _oom(device, architecture, size, limit, options)


def _oom(
    device: torch.device, architecture: str, size: int, limit: Limit, options: UpscaleOptions
) -> Check:
    from pisa_cli.core.random import random_pipeline

    pipeline = random_pipeline(architecture, device, torch.float32)
    image = noise_photo(size)
    held = _allocated(device)
    _reset_peak(device)
    uncapped = pipeline.upscale_with_info(image, options)
    used = max(_peak(device) - held, 1)
    undo = limit(pipeline, used // 2)
    try:
        capped = pipeline.upscale_with_info(image, options)
    except Exception as error:
        return Check("out of memory halves", False, f"{type(error).__name__}: {error}"[:200])
    finally:
        undo()
    halved = [note for note in capped.notes if "out of memory" in note]
    worst = _worst([capped.image], [uncapped.image])
    detail = f"{(halved or ['no out-of-memory'])[0]}; max diff {worst}/255"
    return Check("out of memory halves", bool(halved) and worst <= OOM_LEVELS, detail)


def cuda_limit(pipeline: PisaPipeline, extra: int) -> Callable[[], None]:
    """The cap on CUDA: the caching allocator's blocks given back first (blocks it keeps
    from the uncapped run would serve the capped one without ever reaching the cap)."""
    device = pipeline.models.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, (torch.cuda.memory_allocated(device) + extra) / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return lambda: torch.cuda.set_per_process_memory_fraction(1.0, device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return 1 << 30


def all_checks(device: torch.device, progress: Callable[[str], None] = lambda _: None):
    """Every check on ``device``, in order (``progress`` told each group's name)."""
    groups: list[tuple[str, Callable[[], list[Check] | Check]]] = [
        ("parity", lambda: parity_checks(device)),
        ("bf16 / fp16", lambda: low_precision_checks(device)),
        ("fp16 redo", lambda: redo_check(device)),
        ("out of memory", lambda: oom_check(device)),
        ("--compile", lambda: compile_check(device)),
    ]
    checks: list[Check] = []
    for name, run in groups:
        progress(name)
        try:
            found = run()
        except Exception as error:  # one broken group must not hide the others
            log.exception("check group %s failed", name)
            found = Check(name, False, f"{type(error).__name__}: {error}"[:200])
        checks += found if isinstance(found, list) else [found]
    return checks
