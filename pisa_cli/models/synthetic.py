"""Randomly initialised SD-2.1-shaped models, for `pisa doctor`, `pisa bench` and the tests.

The architecture comes from configs shipped in the package: ``tiny`` (a few thousand
parameters per block, same block layout and module names as SD 2.1-base) and ``sd21-base``
(the real SD 2.1-base configs, no weights). Weights are random with a fixed seed; the
tokenizer is a byte-level CLIP BPE vocabulary without merges, enough to tokenize any text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from pisa_cli.models.checkpoint import (
    BRANCHES,
    GROUPS,
    PEFT_DEFAULT_ALPHA,
    LoraLayer,
    PisaCheckpoint,
    adapter_name,
)

ARCHITECTURES = ("tiny", "sd21-base")
LORA_PATTERNS = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv_out",
    "proj_out",
    "proj_in",
    "ff.net.2",
    "ff.net.0.proj",
)
"""Name fragments of the UNet weights PiSA-SR puts a LoRA on (REFERENCE section 2)."""


def config_dir(architecture: str) -> Path:
    """Folder of the shipped configs of ``architecture`` (diffusers layout, no weights)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; one of {ARCHITECTURES}")
    return Path(str(resources.files("pisa_cli") / "configs" / architecture))


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable character table.
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def write_tokenizer(folder: Path, config_source: Path) -> None:
    """Write a working CLIP tokenizer (byte-level vocabulary, no merges) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + i for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = json.loads((config_source / "tokenizer" / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@dataclass
class RandomBase:
    """Random SD-2.1-shaped parts, in float32 on the CPU."""

    unet: torch.nn.Module | None
    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None
    scheduler: object


def build_random_base(
    architecture: str = "tiny", seed: int = 0, text: bool = True, unet: bool = True
) -> RandomBase:
    """Build the parts of ``architecture`` with random weights drawn from ``seed`` (without
    the text encoder or the UNet when not asked for)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    source = config_dir(architecture)

    def config(part: str) -> dict:
        return json.loads((source / part / "config.json").read_text())

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(config("vae")).eval()
    unet_model = UNet2DConditionModel.from_config(config("unet")).eval() if unet else None
    text_encoder = None
    if text:
        from transformers import CLIPTextConfig, CLIPTextModel

        text_config = CLIPTextConfig(**config("text_encoder"))
        text_encoder = CLIPTextModel(text_config).eval()
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    return RandomBase(unet=unet_model, vae=vae, text_encoder=text_encoder, scheduler=scheduler)


def save_random_base(folder: Path, architecture: str = "tiny", seed: int = 0) -> Path:
    """Write a random base model in the diffusers folder layout (safetensors) to ``folder``."""
    parts = build_random_base(architecture, seed)
    source = config_dir(architecture)
    folder.mkdir(parents=True, exist_ok=True)
    parts.unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.text_encoder.save_pretrained(folder / "text_encoder")  # type: ignore[union-attr]
    parts.scheduler.save_pretrained(folder / "scheduler")  # type: ignore[attr-defined]
    write_tokenizer(folder / "tokenizer", source)
    (folder / "model_index.json").write_text((source / "model_index.json").read_text())
    return folder


def lora_target_modules(unet: torch.nn.Module) -> dict[str, list[str]]:
    """The UNet modules PiSA-SR trains a LoRA on, split as the official code splits them.

    Every weight (not bias, not norm) whose name holds one of LORA_PATTERNS; ``encoder`` =
    names with down_blocks or conv_in, ``decoder`` = up_blocks or conv_out, ``others`` = rest.
    """
    groups: dict[str, list[str]] = {group: [] for group in GROUPS}
    for name, _param in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        if not any(pattern in name for pattern in LORA_PATTERNS):
            continue
        module = name.removesuffix(".weight")
        if "down_blocks" in name or "conv_in" in name:
            groups["encoder"].append(module)
        elif "up_blocks" in name or "conv_out" in name:
            groups["decoder"].append(module)
        else:
            groups["others"].append(module)
    return groups


def random_checkpoint(
    unet: torch.nn.Module, rank: int = 4, seed: int = 0, std: float = 0.02
) -> PisaCheckpoint:
    """A PiSA-SR checkpoint with random LoRA weights for ``unet`` (both A and B non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    groups = lora_target_modules(unet)
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, tuple[str, ...]] = {}
    for branch in BRANCHES:
        for group in GROUPS:
            adapter = adapter_name(group, branch)
            names[adapter] = tuple(groups[group])
            for module_name in groups[group]:
                weight = modules[module_name].weight
                if weight.dim() == 2:
                    down_shape, up_shape = (rank, weight.shape[1]), (weight.shape[0], rank)
                else:
                    down_shape = (rank, *weight.shape[1:])
                    up_shape = (weight.shape[0], rank, 1, 1)
                tensors[f"{module_name}.lora_A.{adapter}.weight"] = (
                    torch.randn(down_shape, generator=generator) * std
                )
                tensors[f"{module_name}.lora_B.{adapter}.weight"] = (
                    torch.randn(up_shape, generator=generator) * std
                )
    return PisaCheckpoint(
        ranks={b: rank for b in BRANCHES},
        alphas={b: PEFT_DEFAULT_ALPHA for b in BRANCHES},
        modules=names,
        tensors=tensors,
        source=f"random LoRA (seed {seed})",
    )


def random_lora_layers(
    unet: torch.nn.Module, rank: int = 32, seed: int = 0, std: float = 0.01
) -> list[LoraLayer]:
    """A random LoRA on the same modules as PiSA-SR's (alpha = rank), e.g. a second pass."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    layers = []
    for names in lora_target_modules(unet).values():
        for name in names:
            weight = modules[name].weight
            down_shape = (rank, *weight.shape[1:])
            up_shape = (weight.shape[0], rank) + (() if weight.dim() == 2 else (1, 1))
            down = torch.randn(down_shape, generator=generator) * std
            up = torch.randn(up_shape, generator=generator) * std
            layers.append(LoraLayer(name, down, up, 1.0))
    return layers
