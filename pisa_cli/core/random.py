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
    merged: str = "",
    second_rank: int = 0,
    checkpoint_seed: int = 1,
    family: str = "",
) -> PisaPipeline:
    """``architecture`` (``tiny`` or ``sd21-base``, configs shipped in the package) with
    random weights (seed 0), random weights of ``family`` (its name in ``core.families``;
    "": the default family, PiSA-SR's LoRAs) from ``checkpoint_seed`` and, with
    ``second_rank``, a random second-pass LoRA of that rank (TUDSR-S uses 32). ``merged``:
    the weight set merged ("": the family's)."""
    from transformers import CLIPTokenizer

    from pisa_cli.core.families import family_of, named
    from pisa_cli.core.families.unet_lora import UnetLora
    from pisa_cli.models.second_lora import SecondLora
    from pisa_cli.models.synthetic import (
        build_random_base,
        config_dir,
        random_lora_layers,
        write_tokenizer,
    )
    from pisa_cli.models.text import PromptEncoder

    parts = build_random_base(architecture, seed=0)
    with tempfile.TemporaryDirectory(prefix="pisa-tokenizer-") as folder:
        write_tokenizer(Path(folder), config_dir(architecture))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    prompts = PromptEncoder(lambda: tokenizer, lambda: parts.text_encoder)  # type: ignore[arg-type,return-value]
    first_family = named(family) if family else family_of("")
    weights = first_family.random_weights(parts, checkpoint_seed)
    second = None
    if second_rank:
        layers = tuple(random_lora_layers(parts.unet, second_rank, seed=2))
        lora = SecondLora(layers, SECOND_PASS_TIMESTEP, "random second-pass LoRA")
        second = UnetLora().from_lora(lora)
    merged = merged or first_family.merged_variant(None)
    return build_pipeline(
        parts.unet, parts.vae, prompts, parts.scheduler, weights, device, dtype, merged, second
    )
