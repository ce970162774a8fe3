"""A plain UNet LoRA as the x2 second pass (TUDSR-style: the first pass's output at x2,
the DDPM x0 rule at the timestep the file records or --second-pass-timestep): a peft
adapter folder or a diffusers LoRA ``.safetensors`` (``models.second_lora``, safetensors
and JSON only). The registry's fallback for a second pass: weights no other family claims
are read as such a LoRA, whose reader says what is wrong with them.
"""

from __future__ import annotations

from pathlib import Path

from pisa_cli.core.families.base import Family, LoadedWeights
from pisa_cli.core.passes import PassWeights, Role
from pisa_cli.errors import OptionsError
from pisa_cli.models.lora import UnetAdapter
from pisa_cli.models.second_lora import SecondLora, load_second_lora, peek_timestep
from pisa_cli.options import UpscaleOptions


class UnetLora(Family):
    name = "lora"
    title = "UNet LoRA"
    short = "a UNet LoRA"
    summary = "a UNet-only LoRA (peft folder or diffusers .safetensors) as the x2 pass"
    roles = ("second",)

    def recognises(self, path: Path, role: Role) -> bool:
        return role == "second"

    def load(self, path: Path, role: Role) -> LoadedWeights:
        return self.from_lora(load_second_lora(path))

    def from_lora(self, lora: SecondLora) -> LoadedWeights:
        """Weights from a LoRA read (or made) already."""
        ranks = "/".join(str(r) for r in sorted({layer.down.shape[0] for layer in lora.layers}))
        unet = {"second": UnetAdapter(lora.layers, lora.source)}
        detail = f"UNet LoRA {len(lora.layers)} layers rank {ranks}"
        return LoadedWeights(self, lora.source, unet, None, lora.timestep, detail)

    def timestep(self, flag, recorded, steps, source, role) -> tuple[int, str]:
        timestep = flag if flag is not None else recorded
        if timestep is None:
            raise OptionsError(
                f"{source}: the LoRA file does not say its timestep; pass --second-pass-timestep T"
            )
        if steps is not None and not 0 <= timestep < steps:
            raise OptionsError(f"--second-pass-timestep {timestep} must be from 0 to {steps - 1}")
        origin = "--second-pass-timestep" if flag is not None else "recorded in the file"
        return timestep, origin

    def describe_loaded(self, weights: PassWeights, options: UpscaleOptions, role: Role) -> str:
        return ""

    def describe_planned(self, path, options: UpscaleOptions, role: Role) -> str:
        return f"second pass: {options.second_pass.kind} {path}".rstrip()

    def identity(self, path: Path, options: UpscaleOptions, role: Role) -> dict:
        if Path(path).is_dir():  # a peft folder: refused now, not once -o is made
            peek_timestep(Path(path))
        return {}
