"""HYPIR-SD2's weights (REFERENCE section 10): ``HYPIR_sd2.pth``, a ``torch.save`` of a plain
dict of UNet LoRA tensors, ``<module>.lora_A.default.weight`` (A: (r, in) or (r, in, k, k))
and ``<module>.lora_B.default.weight`` (B: (out, r) or (out, r, 1, 1)), lora_alpha = r.

The file is read with ``torch.load(weights_only=True)`` only and must hold nothing but
tensors under such keys: the official loader demands exactly the LoRA keys of its target
modules, so anything else means the file is not HYPIR's. Ranks come from the shapes and
modules from the keys; every tensor is checked (floats, finite, shapes that agree, rank
above 0) before anything uses it, and ``models.lora`` checks each module exists in the UNet
with the right shape when it merges. The family is recognised from the keys, never from
the file name.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pisa_cli.errors import WeightsError
from pisa_cli.models.checkpoint import LoraLayer

ADAPTER = "default"
"""The peft adapter name in HYPIR's keys (its trainer's ``add_adapter`` default)."""
TARGETS = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_shortcut",
    "conv_out",
    "proj_in",
    "proj_out",
    "ff.net.2",
    "ff.net.0.proj",
)
"""The release's ``lora_modules``: a module whose name ends with none of these is not one
the official loader would accept."""
KEY = re.compile(r"^(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<part>[AB])\.default\.weight$")
NAME = "HYPIR-SD2"
LICENCE = "HYPIR's weights are licensed for non-commercial use only"


@dataclass(frozen=True)
class HypirWeights:
    """The UNet LoRA of HYPIR-SD2, checked, ready to merge (scaling 1: alpha = r)."""

    layers: tuple[LoraLayer, ...]
    source: str

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({layer.down.shape[0] for layer in self.layers}))

    # The same face as an OMGSR-style ``AdapterFolder`` (``core.loading`` builds either):
    # a UNet LoRA, no VAE-encoder LoRA, no recorded timestep.
    @property
    def unet(self) -> tuple[LoraLayer, ...]:
        return self.layers

    @property
    def encoder(self) -> tuple[LoraLayer, ...]:
        return ()

    @property
    def timestep(self) -> int | None:
        return None

    @property
    def unet_source(self) -> str:
        return self.source

    @property
    def encoder_source(self) -> str:
        return self.source

    def describe(self) -> str:
        """One line for the log, `--dry-run` and `pisa doctor`."""
        ranks = "/".join(map(str, self.ranks))
        return f"{NAME} UNet LoRA, {len(self.layers)} layers rank {ranks}"


def is_hypir_weights(path: str | Path) -> bool:
    """Whether ``path`` is a torch file holding a dict with HYPIR's LoRA keys (not PiSA-SR's).
    Decided from the keys: the file is memory-mapped (``weights_only``, no tensor data read),
    so this is cheap even for a large file; False for a folder, a legacy-format or
    unreadable file, or another layout (PiSA-SR's dict has its own keys)."""
    path = Path(path).expanduser()
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any file torch cannot read safely is not recognised as HYPIR's
        return False
    if not isinstance(raw, dict) or "state_dict_unet" in raw:  # PiSA-SR's layout
        return False
    # any of HYPIR's keys: a damaged HYPIR file then gets HYPIR's reader's one-line error
    return any(isinstance(key, str) and KEY.match(key) for key in raw)


def load_hypir_weights(path: str | Path) -> HypirWeights:
    """Read and check ``HYPIR_sd2.pth``; a one-line WeightsError naming the file otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: HYPIR weights not found (no such file)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error).lower()
        if "global" in text:
            raise WeightsError(
                f"{path}: refused to load: the file holds Python objects other than tensors, "
                "and unpickling them could run arbitrary code"
            ) from None
        raise WeightsError(f"{path}: not HYPIR weights (not a readable torch file)") from None
    except RecursionError:
        raise WeightsError(f"{path}: not HYPIR weights (nested too deep)") from None
    except Exception as error:  # whatever else a truncated or foreign file makes torch raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise WeightsError(f"{path}: cannot read HYPIR weights ({reason})") from None
    return HypirWeights(hypir_layers(raw, str(path)), str(path))


def hypir_layers(raw: object, source: str) -> tuple[LoraLayer, ...]:
    """The checked LoRA layers of a loaded HYPIR dict (module order sorted by name)."""
    if not isinstance(raw, dict) or not raw:
        raise WeightsError(f"{source}: not HYPIR weights (expected a dict of LoRA tensors)")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        match = KEY.match(key) if isinstance(key, str) else None
        if match is None:
            raise WeightsError(
                f"{source}: not HYPIR weights (unexpected key {str(key)[:80]!r}; expected "
                "'<UNet module>.lora_A.default.weight' and '.lora_B.default.weight' only)"
            )
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{source}: {key!r} holds a {type(value).__name__}, not a tensor")
        parts.setdefault(match["module"], {})[match["part"]] = value
    return tuple(_layer(module, found, source) for module, found in sorted(parts.items()))


def _layer(module: str, found: dict[str, torch.Tensor], source: str) -> LoraLayer:
    if not any(module == t or module.endswith("." + t) for t in TARGETS):
        raise WeightsError(
            f"{source}: LoRA on {module!r}, which is not one of HYPIR's target modules"
        )
    if "A" not in found or "B" not in found:
        missing = "lora_A" if "A" not in found else "lora_B"
        raise WeightsError(f"{source}: LoRA for {module!r} has no {missing} tensor")
    down, up = found["A"], found["B"]
    shapes = f"{tuple(down.shape)} and {tuple(up.shape)}"
    if not (down.is_floating_point() and up.is_floating_point()):
        raise WeightsError(f"{source}: LoRA for {module!r} holds {down.dtype}, not floats")
    conv = down.dim() == 4 and up.dim() == 4 and tuple(up.shape[2:]) == (1, 1)
    if not (conv or (down.dim() == 2 and up.dim() == 2)) or up.shape[1] != down.shape[0]:
        raise WeightsError(f"{source}: LoRA for {module!r} has shapes {shapes} that do not agree")
    if min(down.shape) == 0 or min(up.shape) == 0:
        raise WeightsError(f"{source}: LoRA for {module!r} has rank 0 or empty tensors ({shapes})")
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise WeightsError(f"{source}: LoRA for {module!r} holds inf or NaN values")
    return LoraLayer(module, down, up, 1.0)
