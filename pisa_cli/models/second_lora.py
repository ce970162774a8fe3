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
TIMESTEP_KEYS = ("timestep", "pisa.timestep")
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
        config_path, weights_path = path / PEFT_CONFIG, path / PEFT_WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise WeightsError(
                f"{path}: a LoRA folder needs {PEFT_CONFIG} and {PEFT_WEIGHTS} (peft's layout)"
            )
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as error:
            raise WeightsError(f"{config_path}: unreadable adapter config ({error})") from None
        tensors, header = _read(weights_path)
        timestep = _timestep(config.get("timestep"), header, weights_path)
        return SecondLora(_layers(tensors, config, path), timestep, str(path))
    if not path.is_file():
        raise WeightsError(f"{path}: second-pass LoRA not found (no such file or folder)")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: a second-pass LoRA must be .safetensors or a peft folder")
    tensors, header = _read(path)
    config = _diffusers_config(header, path)
    return SecondLora(_layers(tensors, config, path), _timestep(None, header, path), str(path))


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
    if value is None:
        return None
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise WeightsError(
            f"{path}: timestep {value!r} in the file is not a whole number"
        ) from None


def _diffusers_config(header: dict[str, str], path: Path) -> dict:
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError:
        raise WeightsError(f"{path}: malformed lora_adapter_metadata in the header") from None
    return {k.removeprefix("unet."): v for k, v in packed.items() if k.startswith("unet.")}


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


def _layers(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> tuple[LoraLayer, ...]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    ignored = 0
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            ignored += 1
            continue
        parts.setdefault(split[0], {})[split[1]] = tensor
    if ignored:
        log.info("%s: ignored %d tensors that are not UNet LoRA weights", path, ignored)
    layers = []
    for module, found in sorted(parts.items()):
        if "down" not in found or "up" not in found:
            missing = "lora_A (down)" if "down" not in found else "lora_B (up)"
            raise WeightsError(f"{path}: LoRA for {module!r} has no {missing} tensor")
        rank = found["down"].shape[0]
        alpha = _alpha(module, found, config, rank)
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        layers.append(LoraLayer(module, found["down"], found["up"], float(scaling)))
    if not layers:
        raise WeightsError(f"{path}: no UNet LoRA weights found in the file")
    return tuple(layers)


def _alpha(module: str, found: dict[str, torch.Tensor], config: dict, rank: int) -> float:
    if "alpha" in found:
        return float(found["alpha"].item())
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(value)
    return float(config.get("lora_alpha", rank))
