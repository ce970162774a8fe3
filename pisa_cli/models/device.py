"""Device and precision choice, and the free memory of a device."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

import torch

from pisa_cli.errors import DeviceError

log = logging.getLogger(__name__)

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


def make_current(device: torch.device) -> None:
    """Make a CUDA device the current one (a rank's, once, before any model): allocations
    and kernels that name no device (cuBLAS handles, a bare "cuda") then land on it, not on
    every rank's cuda:0. A device that is not there is left to resolve_device's message."""
    if device.type != "cuda" or device.index is None or not torch.cuda.is_available():
        return
    if device.index < torch.cuda.device_count():
        torch.cuda.set_device(device)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA GPUs and CPUs that compute it natively, else fp16 on CUDA/MPS,
    fp32 on other CPUs."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_bf16(device) else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    dtype = DTYPES[spec]
    if device.type == "cpu" and dtype == torch.float16:
        raise DeviceError("--dtype fp16 is not supported on the CPU; use bf16 or fp32")
    return dtype


BF16_CAPABILITY = (8, 0)
"""The first CUDA compute capability with bf16 tensor cores (Ampere)."""


def cuda_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes bf16 natively: compute capability 8.0 or more.

    Not ``torch.cuda.is_bf16_supported()``: it says yes where bf16 is only emulated (T4,
    V100, Turing: slow, no tensor cores) and asks the current device, not this one."""
    return tuple(torch.cuda.get_device_capability(device)) >= BF16_CAPABILITY


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (CUDA: free + cached; MPS: Metal's
    recommended working set less what torch holds; CPU: available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return mps_free_memory()
    return available_ram() + heap_free_bytes()


def host_free_memory(device: torch.device) -> int | None:
    """RAM free for the host buffers of work on ``device`` (the tiled VAE's planes), or
    None on the CPU, where host and device memory are one."""
    return None if device.type == "cpu" else free_memory(torch.device("cpu"))


def mps_free_memory() -> int:
    """Apple MPS: the working set Metal recommends for this process less what torch's
    allocator holds for live tensors (its cache can be reused, as CUDA's)."""
    mps = torch.mps
    return max(0, int(mps.recommended_max_memory()) - int(mps.current_allocated_memory()))


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA, MPS) to finish; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def empty_caches() -> None:
    """Give the memory cached by torch's CUDA and MPS allocators back to the driver."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _mps_available():
        torch.mps.empty_cache()


def available_ram() -> int:
    """Available RAM in bytes: Linux ``MemAvailable``; on macOS, where the RAM is also the
    GPU's, MPS's figure (``mps_free_memory``); elsewhere the free pages, else half the RAM."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if sys.platform == "darwin" and _mps_available():
        return mps_free_memory()
    for name, share in (("SC_AVPHYS_PAGES", 1.0), ("SC_PHYS_PAGES", 0.5)):
        try:
            return int(os.sysconf(name) * os.sysconf("SC_PAGE_SIZE") * share)
        except (ValueError, OSError, AttributeError):
            continue
    return 4 * 2**30


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")
_OOM_STATUSES = (
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR",
    "CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate",
)
"""GPU library failures taken for out of memory (halve and retry). The two ALLOC_FAILED
are allocation failures by NVIDIA's definition ("resource allocation failed inside the
library, usually a cudaMalloc() failure"). cuBLAS failing to create its handle (torch:
"CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`") is an allocation
that failed, in practice always memory. cuDNN's INTERNAL_ERROR is what its convolutions
give when their workspace cannot be had under memory pressure. Left out on purpose:
CUBLAS_STATUS_EXECUTION_FAILED and CUBLAS_STATUS_INTERNAL_ERROR (a failed kernel or copy,
usually a bug or an earlier asynchronous error: no smaller tile helps) and cuDNN's
NOT_INITIALIZED (also a missing or mismatched library). A wrong guess costs a few halvings
and ends as an out-of-memory failure of that image alone."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for the out-of-memory errors of CUDA (``_OOM_STATUSES`` included), MPS and the
    CPU allocator."""
    if isinstance(error, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    if not isinstance(error, RuntimeError):
        return False
    message = str(error)
    lowered = message.lower()
    return any(m in lowered for m in _OOM_MESSAGES) or any(s in message for s in _OOM_STATUSES)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX), where bf16 is fast."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except RuntimeError:
        return False


KEEP_BELOW = 1 << 30
"""Allocations up to this size come from the heap and go back to it when freed."""


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of giving it back to the kernel.

    By default glibc serves every allocation above 128 KiB-32 MiB with a fresh mmap and
    unmaps it on free, so each new activation of the VAE (tens of MB at 512 px) costs a page
    fault per 4 KiB page and the kernel zeroing it. Measured on a 2-core CPU, SD 2.1's VAE in
    bf16 at 512 px: decoder 5.4 s -> 3.9 s, encoder 3.05 s -> 2.2 s. The price: the process
    keeps its peak heap until it ends (the peak itself is unchanged). Linux glibc only;
    True when set.
    """
    mallopt = glibc_function("mallopt")
    if mallopt is None:  # not glibc: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    done = mallopt(m_mmap_threshold, KEEP_BELOW) == 1
    done = mallopt(m_trim_threshold, 2 * KEEP_BELOW) == 1 and done
    log.debug("glibc keeps freed memory below %d bytes for reuse: %s", KEEP_BELOW, done)
    return done


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def heap_free_bytes() -> int:
    """Bytes freed by this process but kept in its heap (see keep_freed_memory): usable
    again, though the system no longer counts them as available. 0 where unknown."""
    mallinfo2 = glibc_function("mallinfo2")  # glibc 2.33 and later
    if mallinfo2 is None:
        return 0
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


@functools.cache
def glibc_function(name: str):
    """A function of the process's glibc (loaded once), or None on other systems and C
    libraries. The planner asks for the heap's free bytes for every image."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
