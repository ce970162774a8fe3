"""Device and precision choice, and the free memory of a device."""

from __future__ import annotations

import os

import torch

from pisa_cli.errors import DeviceError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU. An explicit device must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {spec}: CUDA is not available (no GPU found, or this torch "
                f"{torch.__version__} was built without CUDA); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"--device {spec}: Apple MPS is not available on this machine")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA GPUs and CPUs that support it, else fp16 on CUDA/MPS, fp32 on
    other CPUs."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    dtype = DTYPES[spec]
    if device.type == "cpu" and dtype == torch.float16:
        raise DeviceError("--dtype fp16 is not supported on the CPU; use bf16 or fp32")
    return dtype


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (CUDA: free + cached; CPU: available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return available_ram()


def available_ram() -> int:
    """Available RAM in bytes (Linux ``MemAvailable``; elsewhere a conservative guess)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return int(pages * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """True for the out-of-memory errors of CUDA, MPS and the CPU allocator."""
    if isinstance(error, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MESSAGES)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX), where bf16 is fast."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except RuntimeError:
        return False
