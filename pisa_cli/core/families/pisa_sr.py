"""PiSA-SR (github csslc/PiSA-SR, REFERENCE sections 1-5): two UNet LoRAs (pixel and
semantic) on SD 2.1-base, one step at t = 1, z_H = z_L - eps with the lambdas combined,
StableSR latent tiles, colour fix on the 8-bit output.

Weights: the official ``pisa_sr.pkl`` (a restricted unpickler that builds tensors only) or
our safetensors from `pisa convert` (``models.checkpoint``, which tells the two apart from
their bytes). It is the registry's fallback for a first pass: weights no other family
claims are read as PiSA-SR's, whose reader says what is wrong with them.
"""

from __future__ import annotations

from pathlib import Path

from pisa_cli.core.families.base import Family, LoadedWeights
from pisa_cli.core.passes import PassPlan, PassWeights, Role
from pisa_cli.engine.denoise import variants_needed
from pisa_cli.errors import OptionsError
from pisa_cli.models.checkpoint import PisaCheckpoint, load_checkpoint
from pisa_cli.models.lora import checkpoint_adapters
from pisa_cli.options import UpscaleOptions

TIMESTEP = 1
"""PiSA-SR's fixed UNet timestep."""


class PisaSR(Family):
    name = "pisa-sr"
    title = "PiSA-SR"
    short = "PiSA-SR"
    summary = "two LoRAs, t = 1, adjustable --lambda-pix/--lambda-sem; the default"
    merged = "pisa"

    def recognises(self, path: Path, role: Role) -> bool:
        return role == "first"  # the fallback: its reader names what is wrong

    def load(self, path: Path, role: Role) -> LoadedWeights:
        return self.from_checkpoint(load_checkpoint(path), str(path))

    def random_weights(self, parts, seed: int) -> LoadedWeights:
        from pisa_cli.models.synthetic import random_checkpoint

        return self.from_checkpoint(random_checkpoint(parts.unet, seed=seed), "random LoRA")

    def from_checkpoint(self, checkpoint: PisaCheckpoint, source: str = "") -> LoadedWeights:
        """Weights from a checkpoint read (or made) already."""
        layers = sum(len(names) for names in checkpoint.modules.values())
        detail = f"{layers} LoRA layers, ranks {dict(checkpoint.ranks)}"
        adapters = checkpoint_adapters(checkpoint)
        return LoadedWeights(self, source, adapters, detail=detail)

    def check_present(self, path: Path) -> None:
        if not path.is_file():  # missing, or a folder: its reader says which
            load_checkpoint(path)

    def timestep(self, flag, recorded, steps, source, role) -> tuple[int, str]:
        return TIMESTEP, "fixed"

    def first_variants(self, options: UpscaleOptions) -> tuple[str, ...]:
        return variants_needed(options.lambda_pix, options.lambda_sem)

    def merged_variant(self, options: UpscaleOptions | None) -> str:
        if options is None:
            return "pisa"
        lambdas = (options.lambda_pix, options.lambda_sem)
        return "pisa" if variants_needed(*lambdas) == ("pisa",) else "pix"

    def check_options(self, options: UpscaleOptions) -> None:
        if options.timestep is not None:
            raise OptionsError(
                f"--timestep {options.timestep}: PiSA-SR runs at t = 1; --timestep is for "
                "the other families' weights"
            )

    def first_pass(self, weights: PassWeights, options: UpscaleOptions, steps: int) -> PassPlan:
        self.check_options(options)
        return PassPlan(
            family=self.name,
            variants=variants_needed(options.lambda_pix, options.lambda_sem),
            timestep=TIMESTEP,
            rule="lambdas",
            options=options,
            planner=self.plan_image,
        )

    def repeat_pass(
        self, weights: PassWeights, options: UpscaleOptions, first: PassPlan
    ) -> PassPlan:
        return PassPlan(
            name="second",
            family=self.name,
            variants=first.variants,
            timestep=TIMESTEP,
            rule="lambdas",
            options=options,
            planner=self.plan_image,
        )

    def describe_loaded(self, weights: PassWeights, options: UpscaleOptions, role: Role) -> str:
        return f"{self.title}, timestep {TIMESTEP}"

    def describe_planned(self, path, options: UpscaleOptions, role: Role) -> str:
        return f"model: {self.title} {path or '(default weights)'}, timestep {TIMESTEP}"

    def identity(self, path: Path, options: UpscaleOptions, role: Role) -> dict:
        return {}

    def refuses_sweep(self) -> str:
        return ""
