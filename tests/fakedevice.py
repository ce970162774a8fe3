"""A stand-in accelerator on the CPU: tensors that say they live on another device.

Inside ``on_fake_device()`` the device it yields (``lazy:0``) is usable on any machine: a
tensor moved or created there is an ``OnDevice``, a CPU tensor under a wrapper subclass that
reports the device, and modules moved there get OnDevice parameters. Every operation runs on
the CPU tensors inside, but first checks what a real accelerator checks: an operation that
mixes a device tensor with a CPU tensor (other than a 0-d scalar) raises "Expected all
tensors to be on the same device", and ``.numpy()`` of a device tensor raises (``.tolist()``
too, stricter than CUDA). As on Apple's MPS, float64 on the device raises unless
``float64=True`` (CUDA). torch.Generator(device) gives a CPU generator; which device a
generator was made for is not checked. So the whole pipeline can run with its models "on a
GPU" in a CPU-only test, and a tensor left on the wrong side fails the test as it would on
the GPU.

Why ``lazy``: a wrapper's device needs a device guard, which a CPU build of torch has for
the CPU, meta and lazy only (``mps`` or a renamed PrivateUse1 abort the process, ``cuda``
tries to initialise CUDA), and ``meta`` means "no data" to libraries. The pipeline takes its
accelerator branches (``device.type != "cpu"``) for it like for any GPU; the CUDA- and
MPS-only calls are covered by tests/test_gpu_paths.py with torch.cuda and torch.mps mocked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("lazy", 0)
CPU = torch.device("cpu")

# Operations that legitimately take tensors of two devices.
_CROSS = {
    torch.ops.aten.copy_.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.index.Tensor,  # CPU index tensors are accepted on accelerators
    torch.ops.aten.index_put_.default,
    torch.ops.aten._has_compatible_shallow_copy_type.default,  # module.to(device) asks
}


class DeviceMismatch(RuntimeError):
    """Raised where a real accelerator would refuse to mix devices."""


class NoFloat64(RuntimeError):
    """Raised where MPS would refuse float64."""


class OnDevice(torch.Tensor):
    """A CPU tensor (``inner``) that reports the stand-in device."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> OnDevice:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=FAKE,
            requires_grad=inner.requires_grad,
        )

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"OnDevice({self.inner!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _dispatch(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    on_device = any(isinstance(t, OnDevice) for t in tensors)
    host = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0]
    if on_device and host and func not in _CROSS:
        raise DeviceMismatch(
            f"Expected all tensors to be on the same device, but found at least two devices, "
            f"{FAKE} and cpu! ({func})"
        )
    targets = [torch.device(d).type for d in flat if isinstance(d, torch.device)]
    if FAKE.type in targets:
        to_device = True  # created on, or moved to, the device
    elif targets:
        to_device = False  # .to("cpu"), torch.zeros(..., device="cpu")
    elif func is torch.ops.aten.copy_.default:
        to_device = isinstance(args[0], OnDevice)
    else:
        to_device = on_device
    args, kwargs = tree_map(_host, (args, kwargs))
    out = func(*args, **kwargs)
    if to_device and _STRICT[-1] and any(_is_float64(t) for t in tree_flatten(out)[0]):
        raise NoFloat64(f"{func}: float64 on {FAKE}; MPS has no float64, keep it on the CPU")
    # In-place operations and views hand back their argument or its storage.
    originals = {id(_host(t)): t for t in tensors}

    def wrap(value):
        if not isinstance(value, torch.Tensor):
            return value
        original = originals.get(id(value))
        if original is not None:
            if isinstance(original, OnDevice) == to_device:
                return original
            value = value.clone()  # a move is a copy on a real device
        if not to_device:
            return value
        if func.is_view and not all(t.is_inference() for t in tensors):
            # A view of a tensor made outside inference mode must not be an inference
            # tensor (autograd sets its version counter from its base's).
            with torch.inference_mode(False):
                return OnDevice(value)
        return OnDevice(value)

    return tree_map(wrap, out)


def _is_float64(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float64


def _host(value):
    """The CPU tensor inside an OnDevice, and CPU for the stand-in device."""
    if isinstance(value, OnDevice):
        return value.inner
    if isinstance(value, torch.device) and value.type == FAKE.type:
        return CPU
    return value


_REAL_GENERATOR = torch.Generator


class _FakeDeviceMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class DeviceGenerator(_REAL_GENERATOR):
    """torch.Generator(device) during on_fake_device(): the stand-in device's generators are
    CPU generators (the dispatcher hands operations a plain Generator, so which device a
    generator was made for is not checked)."""

    def __new__(cls, device="cpu"):
        return super().__new__(cls, "cpu")

    def __init__(self, device="cpu"):
        pass


class _GeneratorType(type(_REAL_GENERATOR)):
    def __call__(cls, device="cpu"):
        if torch.device(device).type == FAKE.type:
            return DeviceGenerator(device)
        return _REAL_GENERATOR(device)

    def __instancecheck__(cls, value) -> bool:
        return isinstance(value, _REAL_GENERATOR)


class _Generator(_REAL_GENERATOR, metaclass=_GeneratorType):
    """What torch.Generator is during on_fake_device()."""


def _from_data(make):
    """torch.tensor and torch.as_tensor build their tensor below the dispatch modes: build it
    on the CPU, then move it (a dispatched copy)."""

    def build(data, *args, device=None, **kwargs):
        if device is not None and torch.device(device).type == FAKE.type:
            return make(data, *args, **kwargs).to(FAKE)
        return make(data, *args, device=device, **kwargs)

    return build


_STRICT = [True]
"""Whether float64 on the device raises (on_fake_device's ``float64``)."""


@contextlib.contextmanager
def on_fake_device(float64: bool = False) -> Iterator[torch.device]:
    """While active, the stand-in device (yielded) can be used as any other. Modules move
    there with their parameters swapped for OnDevice ones. ``float64``: allow float64 on the
    device (CUDA has it; MPS, the default, has not)."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    saved = torch.tensor, torch.as_tensor, torch.Generator
    torch.__future__.set_swap_module_params_on_conversion(True)
    torch.tensor, torch.as_tensor = _from_data(torch.tensor), _from_data(torch.as_tensor)
    torch.Generator = _Generator  # type: ignore[misc]
    _STRICT.append(not float64)
    try:
        with _FakeDeviceMode():
            yield FAKE
    finally:
        _STRICT.pop()
        torch.tensor, torch.as_tensor, torch.Generator = saved  # type: ignore[misc]
        torch.__future__.set_swap_module_params_on_conversion(swap)


def is_on_device(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, OnDevice)
