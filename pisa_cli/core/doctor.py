"""`pisa doctor`'s checks: what this machine offers, where the models are, and a real run
of the whole pipeline on a tiny random model to prove the install works."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import torch

from pisa_cli.errors import PisaError
from pisa_cli.options import ModelOptions

OK, INFO, MISSING, BROKEN = "ok", "info", "missing", "broken"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: str
    """ok, info, missing (the install works, something must still be fetched) or broken."""
    detail: str


def run_checks(model: ModelOptions) -> list[Check]:
    checks = [
        Check("python", INFO, f"{platform.python_version()} on {platform.platform(terse=True)}"),
        Check("torch", INFO, _torch_line()),
    ]
    checks += _device_checks(model)
    checks.append(_base_model_check(model))
    checks.append(_weights_check(model))
    checks.append(_families_check())
    checks.append(_self_test(model))
    return checks


def _torch_line() -> str:
    cuda = torch.version.cuda or "none"
    return f"{torch.__version__} (CUDA build {cuda}, {torch.get_num_threads()} CPU threads)"


def _device_checks(model: ModelOptions) -> list[Check]:
    from pisa_cli.models.device import cuda_bf16, free_memory, resolve_device, resolve_dtype

    checks = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            # The rule of --dtype auto: bf16 from compute capability 8.0, else fp16.
            bf16 = "bf16" if cuda_bf16(torch.device("cuda", index)) else "no bf16: auto is fp16"
            capability = f"compute {props.major}.{props.minor}"
            checks.append(
                Check(
                    f"cuda:{index}",
                    INFO,
                    f"{props.name}, {props.total_memory / 2**30:.1f} GiB, {capability}, {bf16}",
                )
            )
    else:
        checks.append(Check("cuda", INFO, "not available"))
    mps = getattr(torch.backends, "mps", None)
    checks.append(
        Check("mps", INFO, "available" if mps and mps.is_available() else "not available")
    )
    try:
        device = resolve_device(model.device)
        dtype = resolve_dtype(model.dtype, device)
    except PisaError as error:
        return [*checks, Check("device", BROKEN, str(error))]
    free = free_memory(device) / 2**30
    name = str(dtype).removeprefix("torch.")
    checks.append(Check("device", OK, f"{device} with {name}, {free:.1f} GiB free"))
    return checks


def _base_model_check(model: ModelOptions) -> Check:
    from pisa_cli.models.base import check_base_folder, find_local_base_model

    spec = model.resolved_base_model()
    folder = find_local_base_model(spec)
    if folder is None:
        return Check(
            "base model",
            MISSING,
            f"{spec} is not here yet: the first `pisa upscale` downloads it (about 5 GB, "
            "needs network), or pass --base-model /path/to/folder",
        )
    try:
        check_base_folder(folder)
    except PisaError as error:
        return Check("base model", MISSING, str(error))
    return Check("base model", OK, str(folder))


def _weights_check(model: ModelOptions) -> Check:
    """The weights and the model family they make (its own line, ``Family.doctor``)."""
    from pisa_cli.core.families import family_of
    from pisa_cli.models.checkpoint import resolve_weights_path

    try:
        path = resolve_weights_path(model.resolved_weights())
        return Check("weights", OK, family_of(path).doctor(path))
    except PisaError as error:
        return Check("weights", MISSING, str(error))


def _families_check() -> Check:
    """The model families this install knows: built in, and plug-ins from the
    ``pisa_cli.families`` entry-point group (a plug-in that failed to load is BROKEN)."""
    from pisa_cli.core.families import BUILT_IN, families, plugins

    names = [
        f"{f.name} ({'/'.join(f.roles)} pass{'' if f in BUILT_IN else ', plug-in'})"
        for f in families()
    ]
    problems = plugins()[1]
    if problems:
        return Check("families", BROKEN, "; ".join(problems))
    return Check("families", OK, ", ".join(names))


def _self_test(model: ModelOptions) -> Check:
    """Upscale a small random image with a tiny random model on the chosen device."""
    from PIL import Image

    from pisa_cli.core.random import random_pipeline
    from pisa_cli.models.device import resolve_device, resolve_dtype
    from pisa_cli.options import UpscaleOptions

    try:
        device = resolve_device(model.device)
        dtype = resolve_dtype(model.dtype, device)
        start = time.perf_counter()
        pipeline = random_pipeline("tiny", device, dtype)
        image = Image.effect_noise((24, 20), 60).convert("RGB")
        options = UpscaleOptions(process_size=64, lambda_pix=0.8, lambda_sem=0.5)
        out = pipeline.upscale(image, options)
        if out.size != (96, 80):
            return Check("self-test", BROKEN, f"output is {out.size}, expected (96, 80)")
        seconds = time.perf_counter() - start
        return Check(
            "self-test",
            OK,
            f"tiny random model upscaled 24x20 -> 96x80 on {device} in {seconds:.1f} s",
        )
    except Exception as error:
        return Check("self-test", BROKEN, f"{type(error).__name__}: {error}")
