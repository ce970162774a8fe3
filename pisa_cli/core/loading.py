"""Loading the models once per run: SD 2.1-base (hub id or folder), the first pass's weights
(read by their family, ``core.families``), an optional second-pass LoRA, the
merged-UNet and prompt caches, and assembling the PisaPipeline on the device."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pisa_cli.core.families import LoadedWeights, family_of, named
from pisa_cli.core.families.base import Family
from pisa_cli.core.models import Models
from pisa_cli.core.passes import Passes
from pisa_cli.core.pipeline import PisaPipeline
from pisa_cli.engine.lean import use_lean_resnets
from pisa_cli.models import cache
from pisa_cli.models.base import unet_from_state, unet_state_spec
from pisa_cli.models.checkpoint import resolve_weights_path
from pisa_cli.models.device import keep_freed_memory, resolve_device, resolve_dtype
from pisa_cli.models.lora import (
    VARIANT_ADAPTERS,
    PisaUNet,
    check_adapters,
    merge_layers,
    merge_while_loading,
    merged_layers,
    named_adapters,
)
from pisa_cli.models.streamed import give_back_heap
from pisa_cli.models.text import PromptEncoder
from pisa_cli.options import ModelOptions, UpscaleOptions

log = logging.getLogger(__name__)


def merged_variant(options: UpscaleOptions | None, family: Family | str = "") -> str:
    """The weight set worth merging for a run (the others are side paths): the second pass's
    when there is a LoRA second pass (it works on 4x the pixels), else the one the first
    pass's family names (PiSA-SR's for equal lambdas, else its pixel set)."""
    if options is not None and options.second_pass.kind == "tudsr":
        return "second"
    if isinstance(family, str):
        family = named(family) if family else family_of("")
    return family.merged_variant(options)


def load_second(path: str | Path) -> LoadedWeights:
    """The second pass's weights, read by the family they belong to."""
    path = Path(path).expanduser()
    return family_of(path, "second").load(path, "second")


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a pipeline is built from, decided before anything loads."""

    model: ModelOptions
    """Where the models come from and where they run."""
    merged: str = "pisa"
    """The UNet weight set merged into the weights (the others are side paths)."""
    second_weights: str = ""
    """The x2 second pass's LoRA (a tudsr second pass), or none."""
    prompts: tuple[str, ...] = ()
    """Prompts the run will embed: encoded before the UNet loads, so that the float32 text
    encoder (1.4 GB) and the UNet are never in memory together."""

    @classmethod
    def for_run(cls, model: ModelOptions, options: UpscaleOptions | None = None) -> PipelineSpec:
        """The spec for runs of ``options``: the weight set they need most merged, their
        second pass's LoRA loaded."""
        family = family_of(resolve_weights_path(model.resolved_weights()))
        second, prompts = "", ()
        if options is not None:
            prompts = (options.prompt,)
            if options.second_pass.kind == "tudsr":
                second = options.second_pass.weights
                prompts = tuple(dict.fromkeys((options.prompt, options.second_pass.prompt)))
        return cls(model, merged_variant(options, family), second, prompts)


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

    The Python API: keyword arguments override the fields of ``model``. It makes one
    PipelineSpec and builds it (``build``). Raises WeightsError, ModelError or DeviceError
    with a message naming what is wrong.
    """
    overrides = {"weights": weights, "base_model": base_model, "device": device, "dtype": dtype}
    model = replace(
        model or ModelOptions(), **{k: v for k, v in overrides.items() if v is not None}
    )
    return build(PipelineSpec.for_run(model, options))


def build(spec: PipelineSpec) -> PisaPipeline:
    """Load everything ``spec`` names and assemble the pipeline on its device (the one way
    a pipeline is built from files; ``build_pipeline`` assembles one from parts)."""
    from pisa_cli.models.base import check_base_folder, load_part, load_part_in, resolve_base_model

    model = spec.model
    torch_device = resolve_device(model.device)
    torch_dtype = resolve_dtype(model.dtype, torch_device)
    weights_path = resolve_weights_path(model.resolved_weights())
    first = family_of(weights_path).load(weights_path, "first")
    log.info("%s: %s", first.source, first.detail)
    second = load_second(spec.second_weights) if spec.second_weights else None
    folder = resolve_base_model(model.resolved_base_model())
    check_base_folder(folder)
    log.info("base model %s, weights %s", folder, weights_path)
    merged = spec.merged
    key = _merged_key(folder, first, weights_path, merged, torch_dtype, second)
    prompts = PromptEncoder(
        lambda: load_part(folder, "tokenizer"),
        lambda: load_part(folder, "text_encoder"),
        cache_key=_text_key(folder),
    )
    for prompt in spec.prompts:
        prompts(prompt)  # the text encoder comes and goes before the UNet loads
    if spec.prompts:
        give_back_heap()
    state = cache.load_tensors(
        "merged", key, lambda found: cache.mismatch(found, unet_state_spec(folder, torch_dtype))
    )
    premerged, unet = state is not None, None
    if state is not None:
        unet = unet_from_state(folder, state)
    else:  # merged while loading, straight into the compute dtype
        unet = _stream_unet(folder, torch_dtype, merged, first, second)
        premerged = unet is not None
    if unet is None:  # an older layout: diffusers' loader, in float32, merged after
        unet = load_part(folder, "unet")
    vae_dtype = torch.float32 if _vae_loras(first, second) else torch_dtype
    vae_model = load_part_in(folder, "vae", vae_dtype) or load_part(folder, "vae")
    pipeline = build_pipeline(
        unet=unet,
        vae_model=vae_model,
        prompts=prompts,
        scheduler=load_part(folder, "scheduler"),
        weights=first,
        device=torch_device,
        dtype=torch_dtype,
        merged=merged,
        second=second,
        premerged=premerged,
    )
    if state is None:
        cache.save_tensors(
            "merged", key, pipeline.models.unet.unet.state_dict(), keep=cache.MAX_MERGED
        )
    if model.compile:
        pipeline.models.compile()
    return pipeline


def _stream_unet(
    folder: Path,
    dtype: torch.dtype,
    merged: str,
    first: LoadedWeights,
    second: LoadedWeights | None,
) -> torch.nn.Module | None:
    """The UNet in ``dtype`` with the ``merged`` weight set's LoRAs merged while each tensor
    loads (float32 one tensor at a time: the load never holds a float32 UNet); None when it
    cannot be loaded that way (then PisaUNet merges into diffusers' float32 UNet)."""
    from pisa_cli.models.base import load_part_in, part_skeleton

    skeleton = part_skeleton(folder, "unet")
    adapters, sources = named_adapters(_unet_adapters(first, second))
    if any(adapter not in adapters for adapter in VARIANT_ADAPTERS.get(merged, ("?",))):
        return None  # PisaUNet names the problem
    check_adapters(dict(skeleton.named_modules()), adapters, sources)
    adjust = merge_while_loading(merged_layers(adapters, merged))
    return load_part_in(folder, "unet", dtype, adjust, skeleton)


def _unet_adapters(first: LoadedWeights, second: LoadedWeights | None) -> dict:
    """Every UNet LoRA loaded, by adapter name."""
    return {**first.unet, **(second.unet if second is not None else {})}


def _vae_loras(first: LoadedWeights, second: LoadedWeights | None) -> bool:
    """Whether a VAE-encoder LoRA will be merged (then the VAE loads in float32 and is cast
    after the merge, as the UNet's LoRAs round once)."""
    return first.encoder is not None or (second is not None and second.encoder is not None)


def _merged_key(
    folder: Path,
    first: LoadedWeights,
    weights: Path,
    merged: str,
    dtype: torch.dtype,
    second: LoadedWeights | None,
) -> str:
    """Cache key of a merged UNet: digests of everything the merged weights depend on."""
    from pisa_cli.models.base import weights_file

    second_files = []
    if second is not None:
        files = second.family.weight_files(Path(second.source))
        second_files = [cache.file_digest(f) for f in files]
    weights_digest = [cache.file_digest(f) for f in first.family.weight_files(weights)]
    return cache.make_key(
        unet=cache.file_digest(weights_file(folder, "unet")),
        unet_config=cache.file_digest(folder / "unet" / "config.json"),
        weights=weights_digest[0] if weights.is_file() else weights_digest,
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
    weights: LoadedWeights,
    device: torch.device,
    dtype: torch.dtype,
    merged: str = "pisa",
    second: LoadedWeights | None = None,
    premerged: bool = False,
) -> PisaPipeline:
    """Assemble a pipeline from CPU parts: merge the LoRAs (unless ``premerged``: the UNet's
    weights come merged from the cache), then move everything to the device.

    ``weights``: the first pass's, ``second``: the x2 pass's (each read by its family). A
    VAE-encoder LoRA is merged into the encoder of the pass that has one; when the two
    passes need different encoders, the second pass gets its own copy (see _second_vae)."""
    unet.eval().requires_grad_(False)
    vae_model.eval().requires_grad_(False)
    if device.type == "cpu":
        keep_freed_memory()
    second_vae = _second_vae(vae_model, weights, second)
    if weights.encoder is not None:
        encoder = weights.encoder
        merge_layers(vae_model.encoder, list(encoder.layers), encoder.source, "VAE encoder")
    use_lean_resnets(unet)  # the same values, fewer passes over memory
    use_lean_resnets(vae_model)
    pisa_unet = PisaUNet(unet, _unet_adapters(weights, second), merged, premerged)
    pisa_unet.to(device, dtype)
    for model in (vae_model, second_vae):
        if model is not None:
            _vae_to(model, device, dtype)
    passes = Passes(
        weights.pass_weights(),
        timesteps=len(scheduler.alphas_cumprod),  # type: ignore[attr-defined]
        second=second.pass_weights() if second is not None else None,
    )
    models = Models(pisa_unet, vae_model, prompts, scheduler, device, dtype, second_vae)
    return PisaPipeline(models, passes)


def _second_vae(
    vae_model: torch.nn.Module, first: LoadedWeights, second: LoadedWeights | None
) -> torch.nn.Module | None:
    """The VAE of the second pass when its encoder differs from the first pass's, else None.

    Two encoders rather than merging and restoring one: the weights never change after
    loading (as the UNet's), which is exact by construction in any dtype and safe with
    compiled or concurrent use; it costs one VAE encoder (34 M parameters, 68 MB in bf16,
    4 % of the UNet). The copy is made before the first pass's LoRA is merged; the
    decoder and quant_conv are shared, not copied."""
    if second is None or (second.encoder is None and first.encoder is None):
        return None
    encoder = copy.deepcopy(vae_model.encoder)
    if second.encoder is not None:
        own = second.encoder
        merge_layers(encoder, list(own.layers), own.source, "VAE encoder")
    use_lean_resnets(encoder)
    view = copy.copy(vae_model)  # shares the decoder: only the encoder is its own
    view._modules = {**vae_model._modules, "encoder": encoder}
    return view


def _vae_to(vae_model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    if vae_model.dtype != dtype:  # type: ignore[attr-defined]
        vae_model.to(dtype=dtype)  # cast, then move: never on the device in float32
    vae_model.to(device=device)
    if device.type == "cpu" and dtype == torch.bfloat16:
        # Measured on a 2-core AMX CPU: the VAE in bf16 runs ~2x faster channels-last.
        vae_model.to(memory_format=torch.channels_last)
