"""Read and write PiSA-SR checkpoints: the official ``pisa_sr.pkl`` and our safetensors.

The official file is a torch pickle of a dict (REFERENCE section 2). It is read with
``torch.load(weights_only=True)`` only, and its contents are checked to be tensors and plain
containers before anything uses them. Our safetensors file holds the same LoRA tensors under
the same names, with ranks, alphas and module lists as metadata.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pisa_cli.errors import WeightsError
from pisa_cli.fsutil import atomic_path

BRANCHES = ("pix", "sem")
GROUPS = ("encoder", "decoder", "others")
PEFT_DEFAULT_ALPHA = 8.0
"""peft's default ``lora_alpha``, which the official training code left unchanged."""
SAFETENSORS_FORMAT = "pisa-sr-lora"
SAFETENSORS_VERSION = "1"


def adapter_name(group: str, branch: str) -> str:
    """The peft adapter name the official code uses, e.g. ``default_encoder_pix``."""
    return f"default_{group}_{branch}"


@dataclass(frozen=True)
class LoraLayer:
    """One LoRA on one UNet module: ``delta = scaling * B @ A``."""

    module: str
    """Dotted UNet module name, e.g. ``down_blocks.0.resnets.0.conv1``."""
    down: torch.Tensor
    """A: (r, in) for a linear layer, (r, in, k, k) for a conv."""
    up: torch.Tensor
    """B: (out, r) for a linear layer, (out, r, 1, 1) for a conv."""
    scaling: float
    """lora_alpha / r."""


@dataclass(frozen=True)
class PisaCheckpoint:
    """The six LoRA adapters of PiSA-SR (pixel and semantic; encoder, decoder, others)."""

    ranks: Mapping[str, int]
    """LoRA rank per branch (``pix``, ``sem``)."""
    alphas: Mapping[str, float]
    """lora_alpha per branch."""
    modules: Mapping[str, tuple[str, ...]]
    """Module names per adapter name (``default_encoder_pix`` ...)."""
    tensors: Mapping[str, torch.Tensor]
    """``<module>.lora_A.<adapter>.weight`` and ``...lora_B...`` tensors, nothing else."""
    source: str = ""
    """Where it was read from, for messages."""

    def layers(self, branch: str) -> Iterator[LoraLayer]:
        """Every LoRA of one branch, in file order."""
        scaling = self.alphas[branch] / self.ranks[branch]
        for group in GROUPS:
            adapter = adapter_name(group, branch)
            for module in self.modules[adapter]:
                yield LoraLayer(
                    module=module,
                    down=self.tensors[f"{module}.lora_A.{adapter}.weight"],
                    up=self.tensors[f"{module}.lora_B.{adapter}.weight"],
                    scaling=scaling,
                )


WEIGHT_NAMES = ("pisa_sr.safetensors", "pisa_sr.pkl")
DOWNLOAD_HINT = (
    "download pisa_sr.pkl from the PiSA-SR release (https://github.com/csslc/PiSA-SR, "
    "'pretrained models'), then pass --weights PATH, set PISA_WEIGHTS, or put it in "
)


def default_weights_dir() -> Path:
    """Where weights are looked for when none are named: $XDG_CACHE_HOME/pisa-cli."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "pisa-cli"


def resolve_weights_path(spec: str) -> Path:
    """The weights file to use: ``spec`` if given, else the first of WEIGHT_NAMES found in
    :func:`default_weights_dir`."""
    if spec:
        return Path(spec).expanduser()
    folder = default_weights_dir()
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"no PiSA-SR weights given or found; {DOWNLOAD_HINT}{folder}/")


UNET_ADAPTER = "unet_lora_adapter"
ENCODER_ADAPTER = "vae_encoder_lora_adapter"
"""The two peft adapter folders of an adapter-folder model (``core.families`` reads them)."""


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding either adapter folder of that layout."""
    path = Path(path).expanduser()
    return path.is_dir() and any((path / name).is_dir() for name in (UNET_ADAPTER, ENCODER_ADAPTER))


MAX_DEPTH = 16
"""Nesting a checkpoint may have (the official one: dict, dict, tensor); deeper is not ours."""


def load_checkpoint(path: str | Path) -> PisaCheckpoint:
    """Read ``pisa_sr.pkl`` (official) or a safetensors file written by ``pisa convert``.

    Whatever the file holds, a failure is one WeightsError naming the file."""
    path = Path(path)
    kind = _kind(path)
    try:
        return _load_safetensors(path) if kind == "safetensors" else _load_pickle(path)
    except WeightsError:
        raise
    except RecursionError:
        raise WeightsError(f"{path}: not a PiSA-SR checkpoint (nested too deep)") from None
    except MemoryError:
        raise WeightsError(f"{path}: not enough memory to read the checkpoint") from None
    except Exception as error:  # whatever else a foreign file makes a reader raise
        raise WeightsError(f"{path}: not a PiSA-SR checkpoint ({_reason(error)})") from None


def _kind(path: Path) -> str:
    """torch (a zip or a legacy pickle) or safetensors, from the file's first bytes; a
    WeightsError for anything else (a folder, a text file, an empty file)."""
    if path.is_dir():
        if is_adapter_folder(path):
            raise WeightsError(f"{path}: a UNet + VAE-encoder adapter folder, not PiSA-SR weights")
        raise WeightsError(
            f"{path}: is a folder, but not a UNet + VAE-encoder adapter folder (one holding "
            "unet_lora_adapter/ and vae_encoder_lora_adapter/); PiSA-SR weights are one file: "
            "pass the pisa_sr.pkl (or the safetensors file from `pisa convert`) itself"
        )
    if not path.exists():
        raise WeightsError(
            f"{path}: PiSA-SR weights not found (no such file); {DOWNLOAD_HINT}"
            f"{default_weights_dir()}/"
        )
    if not path.is_file():
        raise WeightsError(f"{path}: not a regular file; pass the weights file itself")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as error:
        raise WeightsError(f"{path}: cannot read the weights ({error.strerror or error})") from None
    if not head:
        raise WeightsError(f"{path}: the weights file is empty (0 bytes); download it again")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"  # torch.save's zip, or its legacy format (a pickle, protocol 2)
    if len(head) > 8 and head[8:9] == b"{":  # a header length, then the JSON header
        return "safetensors"
    text = all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head)
    raise WeightsError(
        f"{path}: not a PiSA-SR checkpoint ({'a text file' if text else 'unknown content'}, "
        "neither a torch checkpoint nor safetensors)"
    )


def _reason(error: BaseException) -> str:
    """The gist of a reader's error, on one short line."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:  # torch's long message; the cause comes after
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    line = (text.splitlines() or [type(error).__name__])[0]
    if len(line) > 160:  # torch's own advice follows its first sentence
        line = line.split(". ")[0][:160]
    return line


def _load_pickle(path: Path) -> PisaCheckpoint:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error).lower()
        if "unsupported global" in text or "not an allowed global" in text:
            raise WeightsError(
                f"{path}: refused to load: the checkpoint holds Python objects other than "
                "tensors and plain containers, and unpickling them could run arbitrary code"
            ) from None
        raise WeightsError(
            f"{path}: not a PiSA-SR checkpoint (not a readable pickle: {_reason(error)})"
        ) from None
    except Exception as error:
        raise WeightsError(
            f"{path}: cannot read the checkpoint (truncated or not a torch file: {_reason(error)})"
        ) from None
    _check_plain(raw, path)
    return _from_official_dict(raw, path)


def _check_plain(value: object, path: Path) -> None:
    """Refuse anything but tensors, numbers, strings and lists/dicts of them, nested at
    most MAX_DEPTH deep (walked with a stack of our own: no recursion to run out of)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, torch.Tensor | int | float | str | bool) or item is None:
            continue
        if depth >= MAX_DEPTH:
            raise WeightsError(
                f"{path}: not a PiSA-SR checkpoint (nested more than {MAX_DEPTH} deep)"
            )
        if isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, dict):
            stack.extend((child, depth + 1) for pair in item.items() for child in pair)
        else:
            raise WeightsError(
                f"{path}: checkpoint holds a {type(item).__name__}; expected plain data"
            )


def _from_official_dict(raw: object, path: Path) -> PisaCheckpoint:
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: not a PiSA-SR checkpoint (top level is not a dict)")
    required = [f"lora_rank_unet_{b}" for b in BRANCHES]
    required += [f"unet_lora_{g}_modules_{b}" for b in BRANCHES for g in GROUPS]
    required += ["state_dict_unet"]
    missing = [key for key in required if key not in raw]
    if missing:
        raise WeightsError(f"{path}: not a PiSA-SR checkpoint (missing key {missing[0]!r})")
    ranks = {b: raw[f"lora_rank_unet_{b}"] for b in BRANCHES}
    modules = {
        adapter_name(g, b): raw[f"unet_lora_{g}_modules_{b}"] for b in BRANCHES for g in GROUPS
    }
    state = raw["state_dict_unet"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: 'state_dict_unet' is not a dict of tensors")
    alphas = {b: PEFT_DEFAULT_ALPHA for b in BRANCHES}
    return _build(ranks, alphas, modules, state, path)


def _build(
    ranks: Mapping[str, object],
    alphas: Mapping[str, float],
    modules: Mapping[str, object],
    state: Mapping[str, object],
    path: Path,
) -> PisaCheckpoint:
    for branch, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise WeightsError(
                f"{path}: LoRA rank of the {branch} branch is {rank!r:.40}, not a >0 int"
            )
        if not math.isfinite(alphas[branch]):
            raise WeightsError(f"{path}: LoRA alpha of the {branch} branch is not a number")
    clean_modules: dict[str, tuple[str, ...]] = {}
    for adapter, names in modules.items():
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise WeightsError(f"{path}: module list of {adapter} is not a list of names")
        clean_modules[adapter] = tuple(names)
    tensors: dict[str, torch.Tensor] = {}
    for adapter, names in clean_modules.items():
        branch = adapter.rsplit("_", 1)[1]
        for module in names:
            for part, dims in (("lora_A", 0), ("lora_B", 1)):
                key = f"{module}.{part}.{adapter}.weight"
                tensor = state.get(key)
                if not isinstance(tensor, torch.Tensor):
                    raise WeightsError(f"{path}: tensor {key!r} is missing")
                if not tensor.is_floating_point():
                    raise WeightsError(f"{path}: tensor {key!r} holds {tensor.dtype}, not floats")
                if tensor.dim() not in (2, 4) or tensor.shape[dims] != ranks[branch]:
                    raise WeightsError(
                        f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, which does not "
                        f"fit rank {ranks[branch]}"
                    )
                tensors[key] = tensor
    return PisaCheckpoint(
        ranks=dict(ranks),  # type: ignore[arg-type]
        alphas=dict(alphas),
        modules=clean_modules,
        tensors=tensors,
        source=str(path),
    )


def _load_safetensors(path: Path) -> PisaCheckpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != SAFETENSORS_FORMAT:
                raise WeightsError(
                    f"{path}: not a PiSA-SR safetensors file (write one with `pisa convert`)"
                )
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except WeightsError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = _reason(error)
        raise WeightsError(f"{path}: cannot read the safetensors file ({reason})") from None
    try:
        ranks = {b: int(meta[f"lora_rank_unet_{b}"]) for b in BRANCHES}
        alphas = {b: float(meta[f"lora_alpha_unet_{b}"]) for b in BRANCHES}
        modules = {
            adapter_name(g, b): json.loads(meta[f"unet_lora_{g}_modules_{b}"])
            for b in BRANCHES
            for g in GROUPS
        }
    except (KeyError, ValueError, RecursionError) as error:
        reason = _reason(error)
        raise WeightsError(f"{path}: metadata incomplete or malformed ({reason})") from None
    return _build(ranks, alphas, modules, state, path)


def save_safetensors(checkpoint: PisaCheckpoint, path: str | Path) -> None:
    """Write the checkpoint as safetensors (tensors unchanged, bit for bit)."""
    from safetensors.torch import save_file

    meta = {"format": SAFETENSORS_FORMAT, "format_version": SAFETENSORS_VERSION}
    for branch in BRANCHES:
        meta[f"lora_rank_unet_{branch}"] = str(checkpoint.ranks[branch])
        meta[f"lora_alpha_unet_{branch}"] = repr(float(checkpoint.alphas[branch]))
        for group in GROUPS:
            names = list(checkpoint.modules[adapter_name(group, branch)])
            meta[f"unet_lora_{group}_modules_{branch}"] = json.dumps(names)
    tensors = {key: t.contiguous() for key, t in checkpoint.tensors.items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=meta)
