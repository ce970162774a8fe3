"""Loading the models once per run: SD 2.1-base (hub id or folder), the PiSA-SR checkpoint,
an optional second-pass LoRA, the merged-UNet and prompt caches, and assembling the
PisaPipeline on the device."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pisa_cli.core.pipeline import PisaPipeline
from pisa_cli.engine.denoise import variants_needed
from pisa_cli.engine.lean import use_lean_resnets
from pisa_cli.models import cache
from pisa_cli.models.base import unet_from_state, unet_state_spec
from pisa_cli.models.checkpoint import PisaCheckpoint, load_checkpoint, resolve_weights_path
from pisa_cli.models.device import keep_freed_memory, resolve_device, resolve_dtype
from pisa_cli.models.lora import PisaUNet
from pisa_cli.models.second_lora import SecondLora, load_second_lora
from pisa_cli.models.text import PromptEncoder
from pisa_cli.options import ModelOptions, UpscaleOptions

log = logging.getLogger(__name__)


def merged_variant(options: UpscaleOptions | None) -> str:
    """The weight set worth merging for a run (the others are side paths): the second pass's
    when there is a LoRA second pass (it works on 4x the pixels), else PiSA's for equal
    lambdas, else the pixel set."""
    if options is None:
        return "pisa"
    if options.second_pass.kind == "tudsr":
        return "second"
    return "pisa" if variants_needed(options.lambda_pix, options.lambda_sem) == ("pisa",) else "pix"


def load_pipeline(
    model: ModelOptions | None = None,
    *,
    weights: str | None = None,
    base_model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    options: UpscaleOptions | None = None,
) -> PisaPipeline:
    """Load SD 2.1-base, the PiSA-SR weights and, when ``options`` ask for a TUDSR-style
    second pass, its LoRA; the weights are merged for ``options``.

    Keyword arguments override the fields of ``model``. Raises WeightsError, ModelError or
    DeviceError with a message naming what is wrong.
    """
    from pisa_cli.models.base import check_base_folder, load_part, resolve_base_model

    model = model or ModelOptions()
    model = ModelOptions(
        base_model=base_model if base_model is not None else model.base_model,
        weights=weights if weights is not None else model.weights,
        device=device if device is not None else model.device,
        dtype=dtype if dtype is not None else model.dtype,
        compile=model.compile,
    )
    torch_device = resolve_device(model.device)
    torch_dtype = resolve_dtype(model.dtype, torch_device)
    weights_path = resolve_weights_path(model.resolved_weights())
    checkpoint = load_checkpoint(weights_path)
    second = None
    if options is not None and options.second_pass.kind == "tudsr":
        second = load_second_lora(options.second_pass.weights)
    folder = resolve_base_model(model.resolved_base_model())
    check_base_folder(folder)
    log.info("base model %s, weights %s", folder, checkpoint.source)
    merged = merged_variant(options)
    key = _merged_key(folder, weights_path, merged, torch_dtype, second)
    state = cache.load_tensors(
        "merged", key, lambda found: cache.mismatch(found, unet_state_spec(folder, torch_dtype))
    )
    unet = load_part(folder, "unet") if state is None else unet_from_state(folder, state)
    prompts = PromptEncoder(
        lambda: load_part(folder, "tokenizer"),
        lambda: load_part(folder, "text_encoder"),
        cache_key=_text_key(folder),
    )
    pipeline = build_pipeline(
        unet=unet,
        vae_model=load_part(folder, "vae"),
        prompts=prompts,
        scheduler=load_part(folder, "scheduler"),
        checkpoint=checkpoint,
        device=torch_device,
        dtype=torch_dtype,
        merged=merged,
        second=second,
        premerged=state is not None,
    )
    if state is None:
        cache.save_tensors("merged", key, pipeline.unet.unet.state_dict(), keep=cache.MAX_MERGED)
    if model.compile:
        pipeline.compile()
    return pipeline


def _merged_key(
    folder: Path, weights: Path, merged: str, dtype: torch.dtype, second: SecondLora | None
) -> str:
    """Cache key of a merged UNet: digests of everything the merged weights depend on."""
    from pisa_cli.models.base import weights_file

    second_files = []
    if second is not None:
        source = Path(second.source)
        files = sorted(source.glob("*")) if source.is_dir() else [source]
        second_files = [cache.file_digest(f) for f in files if f.is_file()]
    return cache.make_key(
        unet=cache.file_digest(weights_file(folder, "unet")),
        unet_config=cache.file_digest(folder / "unet" / "config.json"),
        weights=cache.file_digest(weights),
        merged=merged,
        dtype=str(dtype),
        second=second_files,
    )


def _text_key(folder: Path) -> str:
    """Digest of what a prompt embedding depends on: text encoder and tokenizer files."""
    from pisa_cli.models.base import weights_file

    files = [weights_file(folder, "text_encoder"), folder / "text_encoder" / "config.json"]
    files += sorted((folder / "tokenizer").glob("*"))
    return cache.make_key(files=[cache.file_digest(f) for f in files if f.is_file()])


def build_pipeline(
    unet: torch.nn.Module,
    vae_model: torch.nn.Module,
    prompts: PromptEncoder,
    scheduler: object,
    checkpoint: PisaCheckpoint,
    device: torch.device,
    dtype: torch.dtype,
    merged: str = "pisa",
    second: SecondLora | None = None,
    premerged: bool = False,
) -> PisaPipeline:
    """Assemble a pipeline from CPU parts: merge the LoRAs (unless ``premerged``: the UNet's
    weights come merged from the cache), then move everything to the device."""
    unet.eval().requires_grad_(False)
    vae_model.eval().requires_grad_(False)
    if device.type == "cpu":
        keep_freed_memory()
    use_lean_resnets(unet)  # the same values, fewer passes over memory
    use_lean_resnets(vae_model)
    layers = list(second.layers) if second else None
    source = second.source if second else ""
    pisa_unet = PisaUNet(unet, checkpoint, merged, layers, source, premerged)
    pisa_unet.to(device, dtype)
    vae_model.to(device=device)
    if vae_model.dtype != dtype:  # type: ignore[attr-defined]
        vae_model.to(dtype=dtype)
    if device.type == "cpu" and dtype == torch.bfloat16:
        # Measured on a 2-core AMX CPU: the VAE in bf16 runs ~2x faster channels-last.
        vae_model.to(memory_format=torch.channels_last)
    pipeline = PisaPipeline(pisa_unet, vae_model, prompts, scheduler, device, dtype)
    if second is not None:
        pipeline.second_timestep, pipeline.second_source = second.timestep, second.source
    return pipeline
