"""PiSA-SR's two LoRAs on the SD UNet: merged weights plus an exact low-rank side path.

REFERENCE section 3 needs two weight sets, W_pix = W + delta_pix and W_pisa = W_pix + delta_sem.
We merge one of them into the UNet once, at load, and never touch the weights again. The other
is reached through the semantic LoRA applied unmerged, as a low-rank side path on the modules
it targets: ``y = W_merged x + sign * scaling * B(A(x))`` with sign +1 (pix -> pisa) or -1
(pisa -> pix). The side path can be switched on for a slice of the batch only, so the pixel
and the PiSA passes of the adjustable mode run as one batch of two, and switching between
the two weight sets is a flag: the UNet's parameters stay bit-identical whatever is run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pisa_cli.errors import WeightsError
from pisa_cli.models.checkpoint import LoraLayer, PisaCheckpoint

VARIANT_ADAPTERS = {
    "pix": ("pix",),
    "pisa": ("pix", "sem"),
    "first": ("first",),
    "second": ("second",),
}
"""Each UNet weight set is the base weights plus these LoRAs: PiSA-SR's pixel LoRA, pixel +
semantic LoRA, the UNet LoRA of another family's first pass, and the LoRA of an optional
second pass (TUDSR-style x2); the last two are each trained on the plain backbone."""
ADAPTER_ORDER = ("pix", "sem", "first", "second")
"""The order side paths are installed in (their sums round in this order)."""


@dataclass(frozen=True)
class UnetAdapter:
    """One LoRA of the UNet, checked, and where it was read from (for messages)."""

    layers: tuple[LoraLayer, ...]
    source: str


def checkpoint_adapters(checkpoint: PisaCheckpoint) -> dict[str, UnetAdapter]:
    """The pixel and semantic LoRAs of a PiSA-SR checkpoint, as adapters."""
    source = checkpoint.source or "weights"
    return {b: UnetAdapter(tuple(checkpoint.layers(b)), source) for b in ("pix", "sem")}


VARIANTS = ("pix", "pisa")
"""The two weight sets of PiSA-SR itself."""


def lora_delta(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """The full weight update ``scaling * B @ A`` of one LoRA, in float32, shaped like ``weight``.

    For a conv, A is a k x k conv (r, in, k, k) and B a 1x1 conv (out, r, 1, 1), so every
    kernel tap gets ``B @ A[..., tap]``.
    """
    down = layer.down.to(torch.float32)
    up = layer.up.to(torch.float32)
    if weight.dim() == 2:
        return (up @ down) * layer.scaling
    return torch.einsum("or,rikl->oikl", up.flatten(1), down) * layer.scaling


def check_layer_fits(
    layer: LoraLayer, module: nn.Module | None, source: str, model: str = "UNet"
) -> None:
    """Raise a WeightsError naming the module when a LoRA cannot apply to it."""
    if module is None:
        raise WeightsError(
            f"{source}: LoRA module {layer.module!r} does not exist in the {model} "
            "(are these weights for SD 2.1-base?)"
        )
    rank = layer.down.shape[0]
    if isinstance(module, nn.Linear) and layer.down.dim() == 2:
        expected_down = (rank, module.in_features)
        expected_up = (module.out_features, rank)
    elif isinstance(module, nn.Conv2d) and layer.down.dim() == 4:
        expected_down = (rank, module.in_channels // module.groups, *module.kernel_size)
        expected_up = (module.out_channels, rank, 1, 1)
    else:
        raise WeightsError(
            f"{source}: LoRA for {layer.module!r} has {layer.down.dim()}-D weights but the "
            f"{model} module is a {type(module).__name__}"
        )
    if tuple(layer.down.shape) != expected_down or tuple(layer.up.shape) != expected_up:
        raise WeightsError(
            f"{source}: LoRA for {layer.module!r} has shapes {tuple(layer.down.shape)} and "
            f"{tuple(layer.up.shape)}, the {model} module needs {expected_down} and {expected_up}"
        )


@torch.no_grad()
def merge_layers(model: nn.Module, layers: Sequence[LoraLayer], source: str, name: str) -> None:
    """Merge LoRAs into ``model``'s weights (checked first; ``name`` for messages).

    Every delta of a module is summed in float32 first, then added once: W + (d1 + d2)
    rounds once, whatever the dtype the weights are kept in.
    """
    modules = dict(model.named_modules())
    for layer in layers:
        check_layer_fits(layer, modules.get(layer.module), source, name)
    for module, mine in by_module(layers).items():
        weight = modules[module].weight
        weight.copy_(merged_weight(weight, mine).to(weight.dtype))


def by_module(layers: Sequence[LoraLayer]) -> dict[str, list[LoraLayer]]:
    """``layers`` grouped by the module they apply to, in their order."""
    grouped: dict[str, list[LoraLayer]] = {}
    for layer in layers:
        grouped.setdefault(layer.module, []).append(layer)
    return grouped


@torch.no_grad()
def merged_weight(
    weight: torch.Tensor, layers: Sequence[LoraLayer], scratch: bool = False
) -> torch.Tensor:
    """``weight`` plus the LoRAs of one module, in float32: the deltas summed first, then
    added once (the caller casts: one rounding whatever the dtype the weights are kept in).
    ``scratch``: ``weight`` may be overwritten (a float32 one then holds the result)."""
    delta = lora_delta(layers[0], weight)
    for layer in layers[1:]:
        delta = delta + lora_delta(layer, weight)
    if scratch and weight.dtype == torch.float32:
        return weight.add_(delta.to(weight.device))
    return weight.to(torch.float32) + delta.to(weight.device)


def merge_while_loading(layers: Sequence[LoraLayer]) -> Callable:
    """An ``adjust`` for models/streamed.py: merges ``layers`` (checked already) into the
    weights they target as each is read, in float32 before the cast (in the read buffer,
    which the next tensor overwrites anyway)."""
    grouped = {f"{module}.weight": mine for module, mine in by_module(layers).items()}

    def adjust(name: str, tensor: torch.Tensor) -> torch.Tensor:
        mine = grouped.get(name)
        return tensor if mine is None else merged_weight(tensor, mine, scratch=True)

    return adjust


def named_adapters(
    adapters: Mapping[str, UnetAdapter],
) -> tuple[dict[str, list[LoraLayer]], dict[str, str]]:
    """The UNet LoRAs by adapter name, in ``ADAPTER_ORDER`` (their side paths sum in that
    order), and the file each comes from (for messages)."""
    order = [n for n in ADAPTER_ORDER if n in adapters]
    order += [n for n in adapters if n not in ADAPTER_ORDER]
    layers = {name: list(adapters[name].layers) for name in order}
    return layers, {name: adapters[name].source for name in order}


def check_adapters(
    modules: dict[str, nn.Module], adapters: dict[str, list[LoraLayer]], sources: dict[str, str]
) -> None:
    """Raise a WeightsError naming the first LoRA that does not fit the UNet ``modules``
    (real or on the meta device)."""
    for name, layers in adapters.items():
        for layer in layers:
            check_layer_fits(layer, modules.get(layer.module), sources[name])


def merged_layers(adapters: dict[str, list[LoraLayer]], merged: str) -> list[LoraLayer]:
    """The LoRAs merged into the UNet's weights for the weight set ``merged``."""
    return [layer for adapter in VARIANT_ADAPTERS[merged] for layer in adapters[adapter]]


@dataclass
class _SideBranch:
    """Computes ``scaling * B(A(x))`` for one module, as that module would see x."""

    down: torch.Tensor
    up: torch.Tensor  # already multiplied by the LoRA scaling
    conv: dict[str, object] | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(F.linear(x, self.down), self.up)
        return F.conv2d(F.conv2d(x, self.down, **self.conv), self.up)  # type: ignore[arg-type]


@dataclass
class _SideState:
    segments: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)
    """(start, stop, {adapter: sign}) slices of the batch that get side paths."""


class PisaUNet:
    """The UNet of SD 2.1-base with PiSA-SR's LoRAs (and a second-pass LoRA), ready for one
    step.

    ``merged`` picks the weight set that lives in the parameters (``pix`` for runs that
    need the pixel weights, ``pisa`` for the default mode, ``second`` when a second pass
    does most of the work); every other set is reached through its LoRAs applied unmerged,
    with sign +1 (added) or -1 (taken away), so the parameters never change after loading.
    ``calls`` counts UNet calls (a batch of any size is one call, even where its samples
    run one after the other, see _one_by_one).
    """

    def __init__(
        self,
        unet: nn.Module,
        adapters: Mapping[str, UnetAdapter],
        merged: str = "pisa",
        premerged: bool = False,
    ):
        """``adapters``: the LoRAs loaded, by name (``VARIANT_ADAPTERS`` composes the weight
        sets from them; a set is there when all its adapters are)."""
        self.variants = {k: v for k, v in VARIANT_ADAPTERS.items() if all(a in adapters for a in v)}
        if merged not in self.variants:
            raise ValueError(f"merged must be one of {tuple(self.variants)}, not {merged!r}")
        self.unet = unet
        self.forward: Callable[..., object] = unet
        """What runs the UNet: the module itself, or its compiled form."""
        self.merged = merged
        self.calls = 0
        self._state = _SideState()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._branches: list[_SideBranch] = []
        modules = dict(unet.named_modules())
        layers, sources = named_adapters(adapters)
        check_adapters(modules, layers, sources)
        if not premerged:  # premerged: merged while loading, or by the merged-UNet cache
            self._merge(merged_layers(layers, merged), modules)
        self._install_side_paths(layers, modules)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _merge(self, layers: list[LoraLayer], modules: dict) -> None:
        """Merge ``layers`` (checked already) into the UNet's weights, once, at load."""
        merge_layers(self.unet, layers, "weights", "UNet")

    def _install_side_paths(self, adapters: dict[str, list[LoraLayer]], modules: dict) -> None:
        param = next(self.unet.parameters())
        per_module: dict[str, dict[str, _SideBranch]] = {}
        for adapter, layers in adapters.items():
            for layer in layers:
                module = modules[layer.module]
                conv = None
                if isinstance(module, nn.Conv2d):
                    conv = {
                        "stride": module.stride,
                        "padding": module.padding,
                        "dilation": module.dilation,
                    }
                branch = _SideBranch(
                    down=layer.down.to(param.device, param.dtype),
                    up=(layer.up.to(torch.float32) * layer.scaling).to(param.device, param.dtype),
                    conv=conv,
                )
                self._branches.append(branch)
                per_module.setdefault(layer.module, {})[adapter] = branch
        for name, branches in per_module.items():
            self._hooks.append(modules[name].register_forward_hook(self._make_hook(branches)))

    def _make_hook(self, branches: dict[str, _SideBranch]) -> Callable:
        state = self._state

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not state.segments:
                return None
            x = args[0]
            for start, stop, signs in state.segments:
                whole = start == 0 and stop == output.shape[0]
                for adapter, sign in signs.items():
                    branch = branches.get(adapter)
                    if branch is None:
                        continue
                    if whole:
                        output = output + sign * branch(x)
                    else:
                        output[start:stop] += sign * branch(x[start:stop])
            return output

        return hook

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PisaUNet:
        """Move the UNet and the side paths together (the side paths follow the weights).
        Cast first, then move: a float32 UNet bound for a bf16 GPU never lands there in
        float32 (3.5 GB instead of 1.7). Every parameter is looked at, so a conversion cut
        short (out of memory) is mended by the next one."""
        if dtype is not None and any(p.dtype != dtype for p in self.unet.parameters()):
            self.unet.to(dtype=dtype)
        if device is not None:
            self.unet.to(device=device)
        for branch in self._branches:
            branch.down = branch.down.to(self.device, self.dtype)
            branch.up = branch.up.to(self.device, self.dtype)
        return self

    def signs(self, variant: str) -> dict[str, float]:
        """Side-path signs per adapter that turn the merged weights into ``variant``'s: the
        adapters added first, then those taken away, each in its weight set's order. The
        side paths sum in this order, so it must not follow a set's (the string hash seed
        of the process: a PiSA-SR first pass with a second-pass LoRA came out one way or
        the other from run to run)."""
        if variant not in self.variants:
            raise ValueError(f"unknown UNet variant {variant!r}")
        wanted, merged = self.variants[variant], self.variants[self.merged]
        signs = {adapter: 1.0 for adapter in wanted if adapter not in merged}
        signs.update({adapter: -1.0 for adapter in merged if adapter not in wanted})
        return signs

    @contextlib.contextmanager
    def _side(self, segments: list[tuple[int, int, dict[str, float]]]) -> Iterator[None]:
        self._state.segments = segments
        try:
            yield
        finally:
            self._state.segments = []

    def __call__(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        variants: Sequence[str] = ("pisa",),
        timestep: int = 1,
    ) -> torch.Tensor:
        """eps for every variant: a (len(variants) * N, C, h, w) tensor, variant-major.

        All variants run in one UNet call (on a CPU in bf16 its samples run one after the
        other, see _one_by_one); the side path is on for the batch slices whose variant
        differs from the merged weights.
        """
        n = latents.shape[0]
        batch = latents.repeat(len(variants), 1, 1, 1) if len(variants) > 1 else latents
        # One memory layout whatever the call (a channels-last VAE hands over channels-last
        # latents, repeat() makes them contiguous; expand() gives the prompt a zero stride):
        # in bf16 the layout picks the kernel, and the kernel the rounding.
        batch = batch.contiguous()
        cond = cond.to(batch.dtype).expand(batch.shape[0], -1, -1).contiguous()
        segments = []
        for index, variant in enumerate(variants):
            signs = self.signs(variant)
            if signs:
                segments.append((index * n, (index + 1) * n, signs))
        t = torch.tensor([timestep], device=batch.device, dtype=torch.long)
        self.calls += 1
        if not self._one_by_one(batch):
            with self._side(segments):
                return self.forward(batch, t, encoder_hidden_states=cond, return_dict=False)[0]
        outputs = []
        for index in range(batch.shape[0]):
            mine = [(0, 1, signs) for start, stop, signs in segments if start <= index < stop]
            with self._side(mine):
                sample = batch[index : index + 1]
                out = self.forward(sample, t, encoder_hidden_states=cond[:1], return_dict=False)
                outputs.append(out[0])
        return torch.cat(outputs)

    @staticmethod
    def _one_by_one(batch: torch.Tensor) -> bool:
        """Whether to run the samples of a batch one after the other.

        On a CPU in bf16 (or fp16) the kernels round differently with the batch size: the
        same tile came out up to 0.02 apart in a batch of two and alone on SD 2.1's UNet, and
        the random-weight decoder stretched that to 112 levels in places. One by one, each
        sample's eps is the same whatever shares its call (a sweep point is `pisa upscale`'s
        image bit for bit, the tile batch never changes an output), for 5 % of UNet time
        (measured: two variants 2.22 s batched, 2.34 s one by one). In fp32 the difference
        is float noise, and accelerators gain much more from batches: they keep them.
        """
        return (
            batch.shape[0] > 1
            and batch.device.type == "cpu"
            and batch.dtype in (torch.bfloat16, torch.float16)
        )

    def compile(self) -> None:
        """Run the UNet through torch.compile from now on (eager again if that fails)."""
        from pisa_cli.models.compiled import CompiledOrEager

        self.forward = CompiledOrEager(self.unet, "UNet")
