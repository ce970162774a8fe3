"""What the loaded weights make of each pass: a ``PassPlan`` per pass (family, timestep,
UNet variants, rule, tiling). Decided when the pipeline is built (``Passes``), never
patched on afterwards. The rules come from the weights' family (``core.families``): this
module only asks it, through the ``PassRules`` protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from pisa_cli.engine.tiles import Tiling
from pisa_cli.errors import OptionsError
from pisa_cli.options import SecondPassOptions, UpscaleOptions

Role = Literal["first", "second"]
"""Which pass weights serve: the first pass (``--weights``) or the x2 second pass."""
Rule = Literal["lambdas", "x0", "own"]
"""How a pass turns eps into z_H: z_L - eps with the lambdas combined, the DDPM one-step
x0 formula at the pass's timestep, or the family's own path (``PassPlan.runner``)."""
Encoder = Literal["first", "second"]
"""Whose VAE encoder encodes a pass: the first pass's or the second pass's."""
Variant = Literal["pix", "pisa", "first", "second"]
"""UNet weight sets: the pixel LoRA, both LoRAs, a first-pass LoRA, a second-pass LoRA."""

Planner = Callable[..., Any]
"""A family's image plan: (size, options, widths, dtype_bytes, free, host, variants) ->
ImagePlan (``Family.plan_image``)."""
PassRunner = Callable[..., Any]
"""A family's own pass: (pipeline, image, plan, timings, notes) -> (image, ImagePlan)."""


@dataclass(frozen=True, kw_only=True)
class PassPlan:
    """One pass of the model over an image, as its family plans it."""

    name: str = ""
    """"" for the first pass, "second" for the x2 pass (prefix of its timings)."""
    family: str
    """The name of the family whose weights run (``core.families``)."""
    variants: tuple[Variant, ...]
    """UNet weight sets the pass needs."""
    timestep: int
    rule: Rule
    options: UpscaleOptions
    """Scale, prompt, colour fix, tiles and lambdas of this pass."""
    tiling: Tiling = "stablesr"
    """The UNet tile grid (``engine.tiles``)."""
    encoder: Encoder = "first"
    runner: PassRunner | None = field(default=None, compare=False)
    """The family's own pass (rule ``own``); None: the pipeline's four stages."""
    planner: Planner | None = field(default=None, compare=False)
    """The family's own image plan (its own tiler); None: ``core.planning.plan_image``."""


@dataclass(frozen=True)
class PassWeights:
    """What a pass needs to know of the weights loaded for it."""

    family: PassRules
    source: str = ""
    timestep: int | None = None
    """The timestep the weights record, if they do."""


class PassRules(Protocol):
    """The part of a family (``core.families.base.Family``) that plans passes."""

    name: str

    def first_pass(self, weights: PassWeights, options: UpscaleOptions, steps: int) -> PassPlan:
        """The first pass over ``options`` (OptionsError for options it refuses)."""
        ...

    def second_pass(
        self, weights: PassWeights, options: UpscaleOptions, steps: int, flag: int | None
    ) -> PassPlan:
        """The x2 second pass (``options`` at scale 2 with its prompt; ``flag``: the
        --second-pass-timestep given, if any)."""
        ...

    def repeat_pass(
        self, weights: PassWeights, options: UpscaleOptions, first: PassPlan
    ) -> PassPlan:
        """``--second-pass pisa``: the first pass's weights again at x2 (or refused)."""
        ...

    def refuses_second_pass(self, kind: str) -> str:
        """ "" when a second pass may follow this first pass, else the one-line refusal."""
        ...

    def describe_loaded(self, weights: PassWeights, options: UpscaleOptions, role: Role) -> str:
        """What runs, for the log: the family, the weights and the timestep."""
        ...


@dataclass(frozen=True)
class Passes:
    """The passes a pipeline can run, from the weights it was built with."""

    first: PassWeights
    """The first pass's weights and family."""
    timesteps: int = 1000
    """The scheduler's number of training timesteps (valid timesteps: 0 to this - 1)."""
    second: PassWeights | None = None
    """The second pass's weights and family (a ``second`` UNet variant), if loaded."""

    @property
    def family(self) -> str:
        return self.first.family.name

    def stages(self, options: UpscaleOptions) -> list[PassPlan]:
        """The passes ``options`` ask for: the first pass at ``scale``, then the optional
        x2 pass."""
        rules = self.first.family
        first = rules.first_pass(self.first, options, self.timesteps)
        second = options.second_pass
        if second.kind == "none":
            return [first]
        refusal = rules.refuses_second_pass(second.kind)
        if refusal:
            raise OptionsError(refusal)
        plain = replace(options, scale=2, timestep=None, second_pass=SecondPassOptions())
        if second.kind == "pisa":
            return [first, rules.repeat_pass(self.first, plain, first)]
        if self.second is None:
            raise OptionsError(
                "this pipeline was loaded without a second-pass LoRA; load it with "
                "options that name --second-pass-weights"
            )
        tudsr = replace(plain, prompt=second.prompt)
        return [
            first,
            self.second.family.second_pass(self.second, tudsr, self.timesteps, second.timestep),
        ]

    def describe(self, options: UpscaleOptions) -> list[str]:
        """What runs, for the log: each pass's family, weights and timestep."""
        lines = [self.first.family.describe_loaded(self.first, options, "first")]
        if options.second_pass.kind == "tudsr" and self.second is not None:
            line = self.second.family.describe_loaded(self.second, options, "second")
            if line:
                lines.append(line)
        return lines
