"""HYPIR-SD2 (github XPixelGroup/HYPIR, REFERENCE section 10): one UNet LoRA on SD 2.1-base
(``HYPIR_sd2.pth``), model_t = coeff_t = 200 (--timestep sets both), the x0 rule per
window, its own resize and zero padding, one Gaussian tiler for all three stages (encoder,
UNet, decoder: --process-size is the window, --latent-overlap its overlap), unclamped
decode, the colour fix (wavelet by default) in float before the single quantization. No
lambdas; no second pass. Its weights are licensed for non-commercial use only.

Recognised from the file's keys (``torch.load(weights_only=True)``, memory-mapped); the
pass runs as its own path (``hypir_pass``) under the pipeline's guard.
"""

from __future__ import annotations

from pathlib import Path

from pisa_cli.core.families.base import Family, LoadedWeights
from pisa_cli.core.families.hypir_pass import plan_hypir, run_hypir
from pisa_cli.core.families.hypir_weights import LICENCE, is_hypir_weights, load_hypir_weights
from pisa_cli.core.passes import PassPlan, PassWeights, Role
from pisa_cli.errors import OptionsError, WeightsError
from pisa_cli.models.lora import UnetAdapter
from pisa_cli.options import UpscaleOptions

TIMESTEP = 200
"""HYPIR-SD2's model_t and coeff_t (--timestep sets both)."""


class Hypir(Family):
    name = "hypir"
    title = "HYPIR-SD2 (UNet LoRA, all-stage tiles)"
    short = "HYPIR-SD2"
    summary = "one UNet LoRA, t = 200, all stages in Gaussian windows; non-commercial weights"
    tiling = "windows"
    color_fix = "wavelet"
    licence = LICENCE
    trained_scale = None  # bicubic to the target size first, then restored: any factor

    def recognises(self, path: Path, role: Role) -> bool:
        return bool(str(path)) and is_hypir_weights(path)

    def load(self, path: Path, role: Role) -> LoadedWeights:
        if role != "first":
            raise WeightsError(
                f"{path}: HYPIR-SD2 weights run as the first pass only (pass them as --weights)"
            )
        weights = load_hypir_weights(path)
        unet = {"first": UnetAdapter(weights.layers, weights.source)}
        return LoadedWeights(self, weights.source, unet, detail=weights.describe())

    def timestep(self, flag, recorded, steps, source, role) -> tuple[int, str]:
        origin = "--timestep" if flag is not None else f"default {TIMESTEP}"
        timestep = TIMESTEP if flag is None else flag
        if steps is not None and not 0 <= timestep < steps:
            raise OptionsError(f"--timestep {timestep} must be from 0 to {steps - 1}")
        return timestep, origin

    def first_pass(self, weights: PassWeights, options: UpscaleOptions, steps: int) -> PassPlan:
        self.check_options(options)
        timestep, _ = self.timestep(options.timestep, None, steps, weights.source, "first")
        return PassPlan(
            family=self.name,
            variants=("first",),
            timestep=timestep,
            rule="own",
            options=options,
            tiling=self.tiling,
            runner=run_hypir,
            planner=self.plan_image,
        )

    def plan_image(self, size, options, widths, dtype_bytes, free_bytes, host, variants):
        return plan_hypir(size, options, widths, dtype_bytes, free_bytes)

    def refuses_second_pass(self, kind: str) -> str:
        return (
            f"--second-pass {kind}: HYPIR-SD2 runs as a single pass (it takes --scale up to "
            "16 itself)"
        )

    def describe_loaded(self, weights: PassWeights, options: UpscaleOptions, role: Role) -> str:
        timestep, origin = self.timestep(options.timestep, None, None, weights.source, role)
        return (
            f"{self.title} {weights.source}, model_t = coeff_t = {timestep} ({origin}); "
            "weights for non-commercial use only"
        )

    def describe_planned(self, path, options: UpscaleOptions, role: Role) -> str:
        timestep, _ = self.timestep(options.timestep, None, None, str(path), role)
        return (
            f"model: {self.title} {path}, model_t = coeff_t = {timestep} "
            "(weights for non-commercial use only)"
        )
