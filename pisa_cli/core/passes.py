"""What the loaded weights make of each pass: its family, timestep, UNet variants and
rule. Decided when the pipeline is built (``Passes``), never patched on afterwards."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pisa_cli.engine.denoise import variants_needed
from pisa_cli.errors import OptionsError
from pisa_cli.models.adapters import FAMILY_NAMES, HYPIR, OMGSR, PISA, resolve_timestep
from pisa_cli.options import SecondPassOptions, UpscaleOptions

TIMESTEP = 1
"""PiSA-SR's fixed UNet timestep."""
HYPIR_TIMESTEP = 200
"""HYPIR-SD2's model_t and coeff_t (--timestep sets both)."""


@dataclass(frozen=True)
class Stage:
    """One pass of the model over an image."""

    name: str
    """"" for the PiSA-SR pass, "second" for the x2 pass (prefix of its timings)."""
    variants: tuple[str, ...]
    """UNet weight sets the pass needs."""
    timestep: int
    rule: str
    """pisa: z_H = z_L - eps (lambdas combined); x0: the DDPM one-step formula; hypir:
    HYPIR's whole path (``core.hypir``), x0 per latent window."""
    options: UpscaleOptions
    """Scale, prompt, colour fix, tiles and lambdas of this pass."""
    tiling: str = "stablesr"
    """The UNet tile grid: stablesr (PiSA-SR's script), omgsr (OMGSR-S's script) or hypir
    (HYPIR's windows, for the VAE too)."""
    encoder: str = "first"
    """Whose VAE encoder encodes: the first pass's or the second pass's."""


@dataclass(frozen=True)
class Passes:
    """The passes a pipeline can run, from the weights it was built with."""

    timesteps: int = 1000
    """The scheduler's number of training timesteps (valid timesteps: 0 to this - 1)."""
    family: str = PISA
    """The first pass's model family: pisa-sr, or omgsr (an adapter folder)."""
    first_timestep: int | None = None
    """The timestep an OMGSR-style first pass's folder records, if it does."""
    first_source: str = ""
    has_second: bool = False
    """A second-pass LoRA was loaded (a ``second`` UNet variant)."""
    second_family: str = ""
    """The second pass's LoRA layout: lora (UNet only) or omgsr (an adapter folder)."""
    second_timestep: int | None = None
    """The timestep stored in the second-pass LoRA file, if it has one."""
    second_source: str = ""

    def stages(self, options: UpscaleOptions) -> list[Stage]:
        """The passes ``options`` ask for: the first pass at ``scale`` (PiSA-SR, or an
        OMGSR-style folder at its timestep), then the optional x2 pass."""
        first = self._first_stage(options)
        second = options.second_pass
        if second.kind == "none":
            return [first]
        if self.family == HYPIR:
            raise OptionsError(
                f"--second-pass {second.kind}: HYPIR-SD2 runs as a single pass (it takes "
                "--scale up to 16 itself)"
            )
        plain = replace(options, scale=2, timestep=None, second_pass=SecondPassOptions())
        if second.kind == "pisa":
            if self.family != PISA:
                raise OptionsError(
                    "--second-pass pisa needs PiSA-SR weights; with an adapter folder use "
                    "--second-pass tudsr --second-pass-weights DIR"
                )
            return [first, Stage("second", first.variants, TIMESTEP, "pisa", plain)]
        if not self.has_second:
            raise OptionsError(
                "this pipeline was loaded without a second-pass LoRA; load it with "
                "options that name --second-pass-weights"
            )
        tudsr = replace(plain, prompt=second.prompt)
        if self.second_family == OMGSR:
            timestep, _ = self.second_pass_timestep(second.timestep)
            return [first, Stage("second", ("second",), timestep, "x0", tudsr, OMGSR, "second")]
        timestep = second.timestep if second.timestep is not None else self.second_timestep
        if timestep is None:
            raise OptionsError(
                f"{self.second_source}: the LoRA file does not say its timestep; pass "
                "--second-pass-timestep T"
            )
        steps = self.timesteps
        if not 0 <= timestep < steps:
            raise OptionsError(f"--second-pass-timestep {timestep} must be from 0 to {steps - 1}")
        return [first, Stage("second", ("second",), timestep, "x0", tudsr, encoder="second")]

    def _first_stage(self, options: UpscaleOptions) -> Stage:
        if self.family == HYPIR:
            lambdas = (options.lambda_pix, options.lambda_sem)
            if lambdas != (1.0, 1.0):
                raise OptionsError(
                    "--lambda-pix/--lambda-sem: only PiSA-SR has lambdas; HYPIR-SD2 has none"
                )
            timestep, _ = self.first_pass_timestep(options.timestep)
            return Stage("", ("first",), timestep, HYPIR, options, HYPIR)
        if self.family == PISA:
            if options.timestep is not None:
                raise OptionsError(
                    f"--timestep {options.timestep}: PiSA-SR runs at t = 1; --timestep is for "
                    "OMGSR-style adapter folders"
                )
            lambdas = (options.lambda_pix, options.lambda_sem)
            return Stage("", variants_needed(*lambdas), TIMESTEP, "pisa", options)
        timestep, _ = self.first_pass_timestep(options.timestep)
        return Stage("", ("first",), timestep, "x0", options, OMGSR)

    def first_pass_timestep(self, flag: int | None) -> tuple[int, str]:
        """(timestep, where it came from) of an OMGSR-style or HYPIR first pass; WeightsError
        when it is outside the scheduler's range."""
        if self.family == HYPIR:
            origin = "--timestep" if flag is not None else f"default {HYPIR_TIMESTEP}"
            timestep = HYPIR_TIMESTEP if flag is None else flag
            if not 0 <= timestep < self.timesteps:
                raise OptionsError(f"--timestep {timestep} must be from 0 to {self.timesteps - 1}")
            return timestep, origin
        return resolve_timestep(flag, self.first_timestep, self.timesteps, self.first_source)

    def second_pass_timestep(self, flag: int | None) -> tuple[int, str]:
        """The same for an OMGSR-style second pass (the flag: --second-pass-timestep)."""
        what = "--second-pass-timestep"
        recorded, source = self.second_timestep, self.second_source
        return resolve_timestep(flag, recorded, self.timesteps, source, what)

    def describe(self, options: UpscaleOptions) -> list[str]:
        """What runs, for the log: each pass's family, weights and timestep."""
        lines = []
        if self.family == HYPIR:
            timestep, origin = self.first_pass_timestep(options.timestep)
            lines.append(
                f"{FAMILY_NAMES[HYPIR]} {self.first_source}, model_t = coeff_t = {timestep} "
                f"({origin}); weights for non-commercial use only"
            )
        elif self.family == OMGSR:
            timestep, origin = self.first_pass_timestep(options.timestep)
            lines.append(
                f"{FAMILY_NAMES[OMGSR]} {self.first_source}, timestep {timestep} ({origin})"
            )
        else:
            lines.append(f"{FAMILY_NAMES[PISA]}, timestep {TIMESTEP}")
        if options.second_pass.kind == "tudsr" and self.second_family == OMGSR:
            timestep, origin = self.second_pass_timestep(options.second_pass.timestep)
            lines.append(
                f"second pass: {FAMILY_NAMES[OMGSR]} {self.second_source}, timestep {timestep} "
                f"({origin})"
            )
        return lines
