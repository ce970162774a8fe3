"""The LoRA of a second pass (TUDSR-style x2): a peft adapter folder or a diffusers LoRA file.

Accepted layouts:
- a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (peft);
- one ``.safetensors`` file as diffusers writes it (``unet.<module>.lora_A.weight`` and
  ``lora_B``, or the older ``lora.down`` / ``lora.up``; optional ``<module>.alpha`` tensors
  or ``lora_adapter_metadata`` in the header).
Rank comes from the tensors, alpha from the file (peft: ``lora_alpha``; diffusers without
alphas: alpha = rank, as diffusers itself assumes). The UNet timestep the LoRA was trained
at may be stored as ``timestep`` in the safetensors header or in adapter_config.json.
Text-encoder LoRAs in the file are ignored: the second pass uses the empty-prompt embedding.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pisa_cli.errors import WeightsError
from pisa_cli.models.checkpoint import LoraLayer

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
TIMESTEP_KEYS = ("timestep", "mid_timestep", "pisa.timestep")
_PREFIXES = ("base_model.model.", "unet.")
_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
}


@dataclass(frozen=True)
class SecondLora:
    """LoRA layers for the UNet and the timestep the file names (if any)."""

    layers: tuple[LoraLayer, ...]
    timestep: int | None
    source: str


def load_second_lora(path: str | Path) -> SecondLora:
    """Read a second-pass LoRA; WeightsError with the file and the problem otherwise."""
    path = Path(path).expanduser()
    try:
        return _load(path)
    except WeightsError:
        raise
    except RecursionError:
        raise WeightsError(f"{path}: not a usable second-pass LoRA (nested too deep)") from None
    except Exception as error:  # whatever else a foreign file makes a reader raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise WeightsError(f"{path}: not a usable second-pass LoRA ({reason})") from None


def _load(path: Path) -> SecondLora:
    if path.is_dir():
        adapter = read_peft_folder(path, "UNet", strict=False)
        return SecondLora(adapter.layers, adapter.timestep, str(path))
    if not path.is_file():
        raise WeightsError(f"{path}: second-pass LoRA not found (no such file or folder)")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: a second-pass LoRA must be .safetensors or a peft folder")
    tensors, header = _read(path)
    config = _diffusers_config(header, path)
    return SecondLora(_layers(tensors, config, path), _timestep(None, header, path), str(path))


@dataclass(frozen=True)
class PeftAdapter:
    """One peft adapter folder: its LoRA layers and the timestep it records (if any)."""

    layers: tuple[LoraLayer, ...]
    timestep: int | None
    source: str
    """The folder, for messages."""

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({layer.down.shape[0] for layer in self.layers}))


def read_peft_folder(folder: Path, target: str, strict: bool = True) -> PeftAdapter:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for
    ``target`` (a name for messages). The config is read as JSON and checked; ``strict``
    refuses tensors that are not plain LoRA weights and ranks that differ from the config's.
    Nothing is unpickled."""
    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise WeightsError(
            f"{folder}: a LoRA folder needs {PEFT_CONFIG} and {PEFT_WEIGHTS} (peft's layout)"
        )
    config = _read_config(config_path)
    tensors, header = _read(weights_path)
    if strict:
        _check_keys(tensors, weights_path, target)
    layers = _layers(tensors, config, weights_path, target)
    if strict:
        _check_ranks(layers, config, weights_path)
    from_config = config.get("timestep", config.get("mid_timestep"))
    return PeftAdapter(layers, _timestep(from_config, header, weights_path), str(folder))


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_bytes())
    except RecursionError:
        raise WeightsError(f"{path}: unreadable adapter config (nested too deep)") from None
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise WeightsError(f"{path}: unreadable adapter config ({reason})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: the adapter config is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise WeightsError(f"{path}: peft_type {peft_type!r} is not LORA")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(flag):
            raise WeightsError(f"{path}: {flag} adapters are not supported")
    rank, alpha = config.get("r", 1), config.get("lora_alpha", 1)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise WeightsError(f"{path}: r {rank!r} is not a whole number above 0")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise WeightsError(f"{path}: lora_alpha {alpha!r} is not a number")
    for name in ("rank_pattern", "alpha_pattern"):
        _check_patterns(config.get(name) or {}, name, path)
    return config


def _check_patterns(patterns: object, name: str, path: Path) -> None:
    """rank_pattern / alpha_pattern: regular expressions of module names mapped to a rank
    (a whole number above 0) or an alpha (a finite number), as peft reads them."""
    if not isinstance(patterns, dict):
        raise WeightsError(f"{path}: {name} is not a JSON object")
    for pattern, value in patterns.items():
        try:
            re.compile(rf"(.*\.)?{pattern}")
        except (re.error, RecursionError, OverflowError) as error:
            raise WeightsError(
                f"{path}: {name} key {pattern!r:.60} is not a valid regular expression ({error})"
            ) from None
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if name == "rank_pattern" and not (number and isinstance(value, int) and value > 0):
            raise WeightsError(
                f"{path}: {name} value {value!r:.40} for {pattern!r:.60} is not a whole number "
                "above 0"
            )
        if name == "alpha_pattern" and not (number and math.isfinite(value)):
            raise WeightsError(
                f"{path}: {name} value {value!r:.40} for {pattern!r:.60} is not a number"
            )


def _check_keys(tensors: dict[str, torch.Tensor], path: Path, target: str) -> None:
    for key in tensors:
        split = _split_key(key)
        if split is None or split[1] == "alpha":
            raise WeightsError(
                f"{path}: tensor {key!r} is not a {target} LoRA weight (lora_A / lora_B)"
            )


def _check_ranks(layers: tuple[LoraLayer, ...], config: dict, path: Path) -> None:
    for layer in layers:
        rank = _pattern(layer.module, config.get("rank_pattern"), config.get("r"))
        down, up = tuple(layer.down.shape), tuple(layer.up.shape)
        if rank is not None and (down[0] != rank or (len(up) > 1 and up[1] != rank)):
            raise WeightsError(
                f"{path}: LoRA for {layer.module!r} has shapes {down} and {up}, which do not "
                f"fit rank {int(rank)} of the adapter config"
            )


def _pattern(module: str, patterns: dict | None, default: object) -> object:
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, header  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"{path}: cannot read the safetensors file ({error})") from None


def _timestep(from_config: object, header: dict[str, str], path: Path) -> int | None:
    value = from_config
    for key in TIMESTEP_KEYS:
        value = header.get(key, value)
    return None if value is None else whole_timestep(value, f"{path}: timestep")


MAX_TIMESTEP = 999
"""The last timestep of SD 2.1-base's scheduler (1000 training steps)."""


def whole_timestep(value: object, what: str) -> int:
    """A recorded timestep: a whole number from 1 to MAX_TIMESTEP (a JSON number or the
    digits of a string); WeightsError starting with ``what`` for anything else (273.9,
    true, a list, 5,000 digits)."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d{1,4}\s*", value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_TIMESTEP:
        return value
    raise WeightsError(f"{what} {value!r:.40} is not a whole number from 1 to {MAX_TIMESTEP}")


def _diffusers_config(header: dict[str, str], path: Path) -> dict:
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except (ValueError, RecursionError):
        raise WeightsError(f"{path}: malformed lora_adapter_metadata in the header") from None
    if not isinstance(packed, dict):
        raise WeightsError(f"{path}: lora_adapter_metadata in the header is not a JSON object")
    config = {k.removeprefix("unet."): v for k, v in packed.items() if k.startswith("unet.")}
    for name in ("rank_pattern", "alpha_pattern"):
        _check_patterns(config.get(name) or {}, name, path)
    return config


def _split_key(key: str) -> tuple[str, str] | None:
    """(module, 'down'|'up'|'alpha') of a UNet LoRA key, or None for anything else."""
    if key.startswith(("text_encoder", "te_", "lora_te")):
        return None
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    adapter = re.match(r"^(.*)\.lora_([AB])\.[^.]+\.weight$", key)  # named peft adapters
    if adapter:
        return adapter.group(1), "down" if adapter.group(2) == "A" else "up"
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return None


def _layers(
    tensors: dict[str, torch.Tensor], config: dict, path: Path, target: str = "UNet"
) -> tuple[LoraLayer, ...]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    ignored = 0
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            ignored += 1
            continue
        parts.setdefault(split[0], {})[split[1]] = tensor
    if ignored:
        log.info("%s: ignored %d tensors that are not %s LoRA weights", path, ignored, target)
    layers = []
    for module, found in sorted(parts.items()):
        if "down" not in found or "up" not in found:
            missing = "lora_A (down)" if "down" not in found else "lora_B (up)"
            raise WeightsError(f"{path}: LoRA for {module!r} has no {missing} tensor")
        if found["down"].dim() not in (2, 4) or found["up"].dim() != found["down"].dim():
            down, up = tuple(found["down"].shape), tuple(found["up"].shape)
            raise WeightsError(f"{path}: LoRA for {module!r} has shapes {down} and {up}")
        rank = found["down"].shape[0]
        if min(found["down"].shape) == 0 or min(found["up"].shape) == 0:
            down, up = tuple(found["down"].shape), tuple(found["up"].shape)
            raise WeightsError(f"{path}: LoRA for {module!r} has empty tensors {down} and {up}")
        alpha = _alpha(module, found, config, rank)
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        layers.append(LoraLayer(module, found["down"], found["up"], float(scaling)))
    if not layers:
        raise WeightsError(f"{path}: no {target} LoRA weights found in the file")
    return tuple(layers)


def _alpha(module: str, found: dict[str, torch.Tensor], config: dict, rank: int) -> float:
    if "alpha" in found:
        return float(found["alpha"].item())
    return float(_pattern(module, config.get("alpha_pattern"), config.get("lora_alpha", rank)))  # type: ignore[arg-type]


def peek_timestep(folder: Path) -> int | None:
    """The timestep a peft adapter folder records, from its config and safetensors header
    only (no tensors read); None when it records none. The layout, the config and the
    LoRA tensors' shapes are checked as loading would (WeightsError), so a folder that
    cannot load is refused before anything is created."""
    from safetensors import SafetensorError, safe_open

    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise WeightsError(
            f"{folder}: a LoRA folder needs {PEFT_CONFIG} and {PEFT_WEIGHTS} (peft's layout)"
        )
    config = _read_config(config_path)
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"{weights_path}: cannot read the safetensors file ({error})") from None
    for key, shape in shapes.items():
        split = _split_key(key)
        if split is not None and split[1] != "alpha" and 0 in shape:
            raise WeightsError(f"{weights_path}: LoRA tensor {key!r} is empty {tuple(shape)}")
    return _timestep(config.get("timestep", config.get("mid_timestep")), header, weights_path)
