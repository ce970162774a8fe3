"""The SD 2.1-base backbone: find it (hub id or folder), check its shape, load its parts.

A hub id is fetched with huggingface_hub into the normal HF cache, only the files we use
(UNet, VAE, text encoder, tokenizer, scheduler; safetensors when the repository has them),
and the cache is tried first so an offline machine that has the files never needs the
network. Every failure becomes one ModelError that says what is missing and how to get it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pisa_cli.errors import ModelError

LAYOUT_HINT = (
    "a diffusers SD 2.1-base folder has unet/, vae/, text_encoder/, tokenizer/, scheduler/"
)
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
TOKENIZER_FILES = ("vocab.json", "merges.txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BaseModelInfo:
    """What a checked base model folder holds."""

    folder: Path
    latent_channels: int
    """Channels of the VAE latent (4 for SD)."""
    vae_factor: int
    """Image pixels per latent pixel along one side (8 for SD)."""
    cross_attention_dim: int
    """Width of the text embedding the UNet attends to."""
    has_text_encoder: bool
    """Whether text_encoder/ and tokenizer/ are complete (needed to encode a prompt)."""


def resolve_base_model(spec: str) -> Path:
    """Turn a hub id or folder into a local folder, downloading the files we use if needed."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{spec}: the base model must be a folder or a hub id, not a file")
        return path
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelError(f"{spec}: base model folder not found (and not a hub id like owner/name)")
    return _download(spec)


def find_local_base_model(spec: str) -> Path | None:
    """The folder ``spec`` names, or its complete copy in the HF cache; never downloads."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not _HUB_ID.match(spec):
        return None
    from huggingface_hub import snapshot_download

    for weights in ("safetensors", "bin"):
        try:
            folder = Path(
                snapshot_download(
                    spec, allow_patterns=_hub_patterns(weights), local_files_only=True
                )
            )
        except Exception:
            continue
        if not _missing_files(folder):
            return folder
    return None


def _hub_patterns(weights: str) -> list[str]:
    files = ["model_index.json", "tokenizer/*", *CONFIG_FILES.values()]
    index = 0 if weights == "safetensors" else 1
    files += [f"{part}/{names[index]}" for part, names in WEIGHT_FILES.items()]
    return files


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    hint = (
        f"download it where there is network with `hf download {repo_id} --exclude '*.ckpt'`"
        f" (or `huggingface-cli download`), or pass --base-model /path/to/folder"
    )
    # The cache first: a complete copy there needs no network at all.
    cached = find_local_base_model(repo_id)
    if cached is not None:
        return cached
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_hub_patterns("safetensors")))
        if _missing_files(folder):  # an older repository: pickled .bin weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=_hub_patterns("bin")))
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"{repo_id}: cannot get the base model from the Hugging Face hub ({reason[:200]}); "
            f"{hint}"
        ) from None
    missing = _missing_files(folder)
    if missing:
        raise ModelError(f"{repo_id}: the hub repository lacks {missing[0]}; {hint}")
    return folder


def _missing_files(folder: Path, need_text: bool = True) -> list[str]:
    """Relative paths of required files that are absent (weights: any accepted format)."""
    missing = []
    for part, config in CONFIG_FILES.items():
        if part == "text_encoder" and not need_text:
            continue
        if not (folder / config).is_file():
            missing.append(config)
    for part, names in WEIGHT_FILES.items():
        if part == "text_encoder" and not need_text:
            continue
        if not any((folder / part / name).is_file() for name in names):
            missing.append(f"{part}/{names[0]} (or {names[1]})")
    if need_text:
        for name in TOKENIZER_FILES:
            if not (folder / "tokenizer" / name).is_file():
                missing.append(f"tokenizer/{name}")
    return missing


def _read_config(folder: Path, relative: str) -> dict:
    try:
        return json.loads((folder / relative).read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{folder / relative}: unreadable config ({error})") from None


def read_part_config(folder: Path, part: str) -> dict:
    """The config.json of one part (unet, vae, text_encoder, scheduler) of a base model."""
    return _read_config(folder, CONFIG_FILES[part])


def check_base_folder(folder: Path, need_text: bool = True) -> BaseModelInfo:
    """Check that ``folder`` is an SD-2.1-shaped diffusers folder; raise ModelError if not."""
    if not folder.is_dir():
        raise ModelError(f"{folder}: base model folder not found")
    missing = _missing_files(folder, need_text=need_text)
    if missing:
        raise ModelError(
            f"{folder}: not a usable base model: {missing[0]} is missing ({LAYOUT_HINT})"
        )
    unet = _read_config(folder, CONFIG_FILES["unet"])
    vae = _read_config(folder, CONFIG_FILES["vae"])

    def wrong(what: str) -> ModelError:
        return ModelError(f"{folder}: not SD-2.1-shaped: {what}")

    if unet.get("_class_name") != "UNet2DConditionModel":
        raise wrong(f"unet is a {unet.get('_class_name')}, expected UNet2DConditionModel")
    if vae.get("_class_name") != "AutoencoderKL":
        raise wrong(f"vae is a {vae.get('_class_name')}, expected AutoencoderKL")
    latent = vae.get("latent_channels", 4)
    if unet.get("in_channels") != latent or unet.get("out_channels") != latent:
        raise wrong(
            f"the UNet maps {unet.get('in_channels')} to {unet.get('out_channels')} channels but "
            f"the VAE latent has {latent}"
        )
    factor = 2 ** (len(vae.get("block_out_channels", [])) - 1)
    if factor != 8:
        raise wrong(f"the VAE shrinks images by {factor}, SD 2.1 by 8")
    cross = unet.get("cross_attention_dim")
    has_text = not _missing_files(folder, need_text=True)
    if has_text:
        text = _read_config(folder, CONFIG_FILES["text_encoder"])
        if text.get("hidden_size") != cross:
            raise wrong(
                f"the text encoder gives {text.get('hidden_size')}-wide embeddings, the UNet "
                f"attends to {cross}"
            )
    return BaseModelInfo(
        folder=folder,
        latent_channels=int(latent),
        vae_factor=factor,
        cross_attention_dim=int(cross),
        has_text_encoder=has_text,
    )


def load_part(folder: Path, part: str):
    """Load one part (unet, vae, scheduler, text_encoder, tokenizer) in float32 on the CPU."""
    try:
        if part == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        if part == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_pretrained(folder, subfolder="vae")
        if part == "scheduler":
            from diffusers import DDPMScheduler

            return DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        if part == "text_encoder":
            from transformers import CLIPTextModel

            return CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        if part == "tokenizer":
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    except ModelError:
        raise
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{folder / part}: cannot load the {part} ({reason[:300]})") from None
    raise ValueError(f"unknown part {part!r}")


def weights_file(folder: Path, part: str) -> Path:
    """The weights file of ``part`` (safetensors preferred), for hashing."""
    for name in WEIGHT_FILES[part]:
        if (folder / part / name).is_file():
            return folder / part / name
    raise ModelError(f"{folder / part}: no weights file ({' or '.join(WEIGHT_FILES[part])})")


def unet_state_spec(folder: Path, dtype: torch.dtype) -> dict:
    """Name -> (shape, ``dtype``) of every weight of ``folder``'s UNet: what a merged UNet
    cached for this base model and dtype must hold (built on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_part_config(folder, "unet"))
    return {name: (tuple(tensor.shape), dtype) for name, tensor in unet.state_dict().items()}


def unet_from_state(folder: Path, state: dict) -> object:
    """A UNet built from ``folder``'s config and given weights, without random init."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_part_config(folder, "unet"))
    unet.load_state_dict(state, assign=True, strict=True)
    return unet.eval()


def part_skeleton(folder: Path, part: str) -> torch.nn.Module:
    """The unet or vae of ``folder``'s config on the meta device (no memory, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    kind = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[part]
    with torch.device("meta"):
        return kind.from_config(read_part_config(folder, part))


def load_part_in(
    folder: Path,
    part: str,
    dtype: torch.dtype,
    adjust: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    skeleton: torch.nn.Module | None = None,
) -> torch.nn.Module | None:
    """The unet or vae of ``folder`` read straight into ``dtype``, one tensor at a time
    (models/streamed.py; into ``skeleton`` when given, see part_skeleton), ``adjust``
    applied to each float tensor first; None when the weights are in a layout only
    diffusers' own loader converts (then use load_part)."""
    from pisa_cli.models.streamed import load_streamed

    model = skeleton if skeleton is not None else part_skeleton(folder, part)
    return load_streamed(model, weights_file(folder, part), dtype, adjust)
