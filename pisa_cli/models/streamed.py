"""Loading a diffusers part one tensor at a time, straight into the compute dtype.

diffusers' ``from_pretrained`` builds the model in float32 and reads the whole state dict
before assigning it, so a bf16 run of SD 2.1-base held the 3.5 GB float32 UNet (and, moved
to a GPU before the cast, put 3.5 GB there too) for weights that end at 1.7 GB. Here the
model is built on the meta device (no memory), each tensor is read from the file with plain
reads (no memory map: mapped pages would count in the resident set until the file is
closed), adjusted in float32 where asked (the LoRA merge: ``W + delta`` rounds once, as
merging the float32 model and casting afterwards), cast, and kept; the float32 copy of one
tensor is all that exists at a time. Peak: the part in the compute dtype plus its largest
tensor in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from pisa_cli.errors import ModelError, PisaError

log = logging.getLogger(__name__)

Adjust = Callable[[str, torch.Tensor], torch.Tensor]
"""(name, float tensor as stored) -> the tensor to keep, before the cast."""


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a weights file, one at a time, in file order.

    safetensors: read with plain reads (no memory map) into one buffer that the next tensor
    overwrites: the caller copies what it keeps (load_streamed casts or clones). A pickled
    ``.bin``: torch.load with mmap (its pages are mapped until the last tensor is read)."""
    if path.suffix != ".safetensors":
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        yield from state.items()
        return
    from pisa_cli.models.cache import safetensors_spans

    _size, spans = safetensors_spans(path)
    largest = max((end - start for _, start, end, _ in spans.values()), default=0)
    buffer = torch.empty(largest + 64, dtype=torch.uint8)  # one buffer for every tensor
    with open(path, "rb", buffering=0) as handle:
        for name, (dtype, start, end, shape) in sorted(spans.items(), key=lambda s: s[1][1]):
            # aligned for the dtype, wherever the tensor starts in the file
            offset = -buffer.data_ptr() % 64
            chunk = buffer[offset : offset + end - start]
            handle.seek(start)
            view, done = memoryview(chunk.numpy()), 0
            while done < len(view):
                count = handle.readinto(view[done:])
                if not count:
                    raise ValueError(f"{path}: file ends inside tensor {name[:80]!r}")
                done += count
            yield name, chunk.view(dtype).view(shape)


def load_streamed(
    model: nn.Module, path: Path, dtype: torch.dtype, adjust: Adjust | None = None
) -> nn.Module | None:
    """Fill ``model`` (built on the meta device) with the weights of ``path`` in ``dtype``;
    floating tensors pass through ``adjust`` first. None when the file's names or shapes are
    not the model's exactly (an older layout that diffusers converts while loading: the
    caller loads it the slow way); ModelError when the file cannot be read."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    try:
        for name, tensor in read_tensors(path):
            if expected.get(name) != tuple(tensor.shape):
                log.debug("%s: %s is not the model's as stored; diffusers loads it", path, name)
                return None
            source = tensor
            if tensor.is_floating_point():
                if adjust is not None:
                    tensor = adjust(name, tensor)
                tensor = tensor.to(dtype)
            state[name] = tensor.clone() if tensor is source else tensor
    except PisaError:
        raise
    except Exception as error:  # any malformed file: a pickle, a zip, a safetensors header
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{path}: cannot read the weights ({reason[:300]})") from None
    if state.keys() != expected.keys():
        return None
    model.load_state_dict(state, assign=True, strict=True)
    give_back_heap()
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None  # a buffer the file does not hold: the model's own init must make it
    return model.eval().requires_grad_(False)


def give_back_heap() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim). A load frees a
    float32 temporary between every two weights it keeps; the holes they leave inside the
    heap stayed resident (0.7 GB after SD 2.1's UNet) under everything the run did next."""
    from pisa_cli.models.device import glibc_function

    trim = glibc_function("malloc_trim")
    if trim is not None:
        trim(0)
