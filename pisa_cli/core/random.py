"""A pipeline on a random model, built in memory: the one way `pisa doctor`'s self-test,
`pisa bench` and the tests make one (no download, no weights file)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pisa_cli.core.loading import build_pipeline
from pisa_cli.core.pipeline import PisaPipeline

SECOND_PASS_TIMESTEP = 200
"""Timestep of the random second-pass LoRA (TUDSR's own value is not published)."""


def random_pipeline(
    architecture: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    merged: str = "pisa",
    second_rank: int = 0,
    checkpoint_seed: int = 1,
    omgsr: bool = False,
) -> PisaPipeline:
    """``architecture`` (``tiny`` or ``sd21-base``, configs shipped in the package) with
    random weights (seed 0), a random PiSA-SR LoRA (``checkpoint_seed``) and, with
    ``second_rank``, a random second-pass LoRA of that rank (TUDSR-S uses 32). ``omgsr``:
    an OMGSR-style first pass instead (random UNet and VAE-encoder LoRAs, timestep 273)."""
    from transformers import CLIPTokenizer

    from pisa_cli.models.second_lora import SecondLora
    from pisa_cli.models.synthetic import (
        build_random_base,
        config_dir,
        random_checkpoint,
        random_lora_layers,
        write_tokenizer,
    )
    from pisa_cli.models.text import PromptEncoder

    parts = build_random_base(architecture, seed=0)
    with tempfile.TemporaryDirectory(prefix="pisa-tokenizer-") as folder:
        write_tokenizer(Path(folder), config_dir(architecture))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    prompts = PromptEncoder(lambda: tokenizer, lambda: parts.text_encoder)  # type: ignore[arg-type,return-value]
    if omgsr:
        from pisa_cli.models.adapters import AdapterFolder

        first = AdapterFolder(
            unet=tuple(random_lora_layers(parts.unet, 8, seed=checkpoint_seed)),
            encoder=tuple(random_lora_layers(parts.vae.encoder, 4, seed=checkpoint_seed + 1)),
            timestep=273,
            source="random OMGSR-style folder",
        )
        return build_pipeline(
            parts.unet,
            parts.vae,
            prompts,
            parts.scheduler,
            None,
            device,
            dtype,
            "first",
            None,
            first=first,
        )
    checkpoint = random_checkpoint(parts.unet, seed=checkpoint_seed)
    second = None
    if second_rank:
        layers = tuple(random_lora_layers(parts.unet, second_rank, seed=2))
        second = SecondLora(layers, SECOND_PASS_TIMESTEP, "random second-pass LoRA")
    return build_pipeline(
        parts.unet, parts.vae, prompts, parts.scheduler, checkpoint, device, dtype, merged, second
    )
