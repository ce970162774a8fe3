"""OMGSR-style adapter folders (REFERENCE section 9): a UNet LoRA and a VAE-encoder LoRA run
at one fixed mid timestep, the layout of OMGSR-S (github wuer5/OMGSR) and, very probably, of
TUDSR-S's two serial LoRAs.

A folder holds two peft adapter folders, ``unet_lora_adapter/`` and
``vae_encoder_lora_adapter/``, each ``adapter_config.json`` + ``adapter_model.safetensors``
(what peft's ``save_pretrained`` writes for adapters of those names). Configs are read as
JSON and tensors from safetensors; nothing is unpickled. The timestep the model was trained
at may be recorded as ``timestep`` or ``mid_timestep`` in either adapter config or
safetensors header, or as ``mid_timestep:`` in a ``cfg.yml`` (the training config
OMGSR's trainer writes) in the folder; else it is OMGSR-S's 273.

Detection is by the layout (the two peft adapter folders), so the CLI can tell the family
cheaply; the configs and tensors are checked when read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pisa_cli.errors import WeightsError
from pisa_cli.models.checkpoint import (
    ENCODER_ADAPTER,
    UNET_ADAPTER,
    LoraLayer,
)
from pisa_cli.models.second_lora import read_peft_folder, whole_timestep

DEFAULT_TIMESTEP = 273
"""OMGSR-S's mid timestep (its script's default and its README's value)."""
TRAINING_CONFIG = "cfg.yml"


@dataclass(frozen=True)
class AdapterFolder:
    """The two LoRAs of an OMGSR-style folder and the timestep it records (if any)."""

    unet: tuple[LoraLayer, ...]
    encoder: tuple[LoraLayer, ...]
    """LoRA of the VAE encoder (module names relative to ``vae.encoder``)."""
    timestep: int | None
    source: str

    @property
    def unet_source(self) -> str:
        return str(Path(self.source) / UNET_ADAPTER)

    @property
    def encoder_source(self) -> str:
        return str(Path(self.source) / ENCODER_ADAPTER)

    def describe(self) -> str:
        """One line for the log and `pisa doctor`."""

        def ranks(layers: tuple[LoraLayer, ...]) -> str:
            return "/".join(str(r) for r in sorted({layer.down.shape[0] for layer in layers}))

        return (
            f"UNet LoRA {len(self.unet)} layers rank {ranks(self.unet)}, VAE-encoder LoRA "
            f"{len(self.encoder)} layers rank {ranks(self.encoder)}"
        )


def load_adapter_folder(path: str | Path) -> AdapterFolder:
    """Read both adapters; WeightsError naming the file and the problem otherwise."""
    path = _checked_layout(path)
    unet = read_peft_folder(path / UNET_ADAPTER, "UNet")
    encoder = read_peft_folder(path / ENCODER_ADAPTER, "VAE encoder")
    timestep = recorded_timestep(path, (unet.timestep, encoder.timestep))
    return AdapterFolder(unet.layers, encoder.layers, timestep, str(path))


def _checked_layout(path: str | Path) -> Path:
    """``path`` as a Path, once it is a folder holding both adapter folders."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise WeightsError(f"{path}: adapter folder not found (no such folder)")
    for name in (UNET_ADAPTER, ENCODER_ADAPTER):
        if not (path / name).is_dir():
            raise WeightsError(
                f"{path / name}: missing; an OMGSR-style folder needs both {UNET_ADAPTER}/ and "
                f"{ENCODER_ADAPTER}/ (peft adapter folders)"
            )
    return path


def recorded_timestep(path: Path, from_adapters: tuple[int | None, ...] = ()) -> int | None:
    """The timestep the folder records: the adapters' (read by the caller) or cfg.yml's.
    Two different values are refused: the model runs at one."""
    found = {t for t in from_adapters if t is not None}
    config = path / TRAINING_CONFIG
    if config.is_file():
        found.add(_config_timestep(config))
        found.discard(None)
    if len(found) > 1:
        values = ", ".join(map(str, sorted(found)))
        raise WeightsError(f"{path}: the folder records different timesteps ({values})")
    return found.pop() if found else None


def _config_timestep(config: Path) -> int | None:
    """``mid_timestep:`` of a cfg.yml (a line of its own, as OMGSR's trainer writes it),
    checked as every recorded timestep is; None when the file has no such line."""
    try:
        text = config.read_bytes().decode("utf-8")
    except OSError as error:
        raise WeightsError(f"{config}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise WeightsError(f"{config}: not UTF-8 text (a training config is YAML)") from None
    match = re.search(r"^mid_timestep:[ \t]*(.*?)[ \t]*(#.*)?$", text, re.MULTILINE)
    if match is None:
        return None
    value = match.group(1)
    if value in ("", "~", "null"):
        return None  # YAML's null: no timestep recorded
    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]  # a quoted YAML scalar
    return whole_timestep(value, f"{config}: mid_timestep")


def folder_timestep(path: str | Path) -> int | None:
    """The recorded timestep, read from configs and headers only (no tensors): for the
    manifest and --dry-run before anything is loaded. The layout, the configs and the
    tensors' shapes are checked on the way (WeightsError)."""
    from pisa_cli.models.second_lora import peek_timestep

    path = _checked_layout(path)
    found = [peek_timestep(path / name) for name in (UNET_ADAPTER, ENCODER_ADAPTER)]
    return recorded_timestep(path, tuple(found))


def resolve_timestep(
    flag: int | None,
    recorded: int | None,
    steps: int | None,
    source: str,
    what: str = "--timestep",
) -> tuple[int, str]:
    """(timestep, where it came from): the flag, else the folder's, else 273; WeightsError
    when it is outside the scheduler's 0..steps-1 (steps None: before the scheduler is
    read, only negative values are refused)."""
    if flag is not None:
        timestep, origin = flag, what
    elif recorded is not None:
        timestep, origin = recorded, "recorded in the folder"
    else:
        timestep, origin = DEFAULT_TIMESTEP, f"default {DEFAULT_TIMESTEP}"
    if timestep < 0 or (steps is not None and timestep >= steps):
        top = "its number of training steps" if steps is None else steps - 1
        raise WeightsError(
            f"{source}: timestep {timestep} ({origin}) is outside the scheduler's range 0 to {top}"
        )
    return timestep, origin


def planned_timestep(
    path: str | Path, flag: int | None, what: str = "--timestep"
) -> tuple[int, str]:
    """(timestep, where it came from) of an adapter folder before anything is loaded (the
    scheduler's range is checked when it is)."""
    return resolve_timestep(flag, folder_timestep(path), None, str(path), what)
