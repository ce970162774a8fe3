"""The contract of a model family: what a family module says, in one place.

A family recognises its weights (from bytes, keys and files, never from a file name alone,
with safe readers only), loads them into named UNet adapters (and a VAE-encoder LoRA if it
has one), plans its passes (timestep, x0 rule, tiling, the options it refuses), and
describes itself for --dry-run, the manifest and report, and `pisa doctor`. Everything
outside ``core/families/`` asks a ``Family``; see CONTRIBUTING.md "Adding a family".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pisa_cli.core.passes import PassPlan, PassWeights, Role
from pisa_cli.core.planning import ImagePlan, plan_image, stablesr_tiles
from pisa_cli.engine.memory import Widths
from pisa_cli.engine.tiles import Tiling
from pisa_cli.errors import OptionsError
from pisa_cli.models.lora import UnetAdapter
from pisa_cli.options import UpscaleOptions

DEFAULT_LAMBDAS = (1.0, 1.0)


@dataclass(frozen=True)
class LoadedWeights:
    """Weights a family read for one pass, ready to merge."""

    family: Family
    source: str
    unet: Mapping[str, UnetAdapter]
    """UNet adapters by name (``models.lora.VARIANT_ADAPTERS`` composes them)."""
    encoder: UnetAdapter | None = None
    """A LoRA of the VAE encoder (module names relative to ``vae.encoder``), if any."""
    timestep: int | None = None
    """The timestep the weights record, if they do."""
    detail: str = ""
    """One line for the log and `pisa doctor` (layers, ranks)."""

    def pass_weights(self) -> PassWeights:
        return PassWeights(self.family, self.source, self.timestep)


class Family:
    """A model family. Subclass it, set the class attributes, override what differs."""

    name: str = ""
    """Short id recorded in the manifest and the report (``--weights`` picks it)."""
    title: str = ""
    """How it is named to people (dry run, log, doctor)."""
    short: str = ""
    """Its name inside a sentence ("HYPIR-SD2", "an OMGSR-style adapter folder")."""
    summary: str = ""
    """One line for `pisa doctor`'s family list: what it is good at."""
    roles: tuple[Role, ...] = ("first",)
    """The passes its weights can serve."""
    tiling: Tiling = "stablesr"
    color_fix: str = "adain"
    """Its colour fix when --color-fix is not given."""
    licence: str = ""
    """A line about its weights' licence, when it restricts their use."""
    merged: str = "first"
    """The UNet weight set worth merging for its first pass (``merged_variant``)."""
    trained_scale: int | None = 4
    """The --scale its weights were trained for (other factors get a warning); None where
    any factor is its own (it resizes the input itself, then restores)."""

    # --- weights -----------------------------------------------------------------------
    def recognises(self, path: Path, role: Role) -> bool:
        """Whether ``path`` holds this family's weights (cheap: names, headers, keys)."""
        raise NotImplementedError

    def load(self, path: Path, role: Role) -> LoadedWeights:
        """Read the weights (WeightsError naming the file and the problem)."""
        raise NotImplementedError

    def check_present(self, path: Path) -> None:
        """Raise the reader's own error (with its hint) when ``path`` is not there."""
        if not path.exists():
            self.load(path, "first")

    def random_weights(self, parts: Any, seed: int) -> LoadedWeights:
        """Random weights of this family's layout for ``parts`` (``models.synthetic``'s
        random base model): the self-test, the bench and the tests."""
        raise NotImplementedError(f"{self.name}: no random weights")

    def weight_files(self, path: Path) -> list[Path]:
        """The files the weights consist of (their digests key caches and the manifest)."""
        path = Path(path).expanduser()
        if path.is_dir():
            return sorted(f for f in path.rglob("*") if f.is_file())
        return [path]

    # --- passes ------------------------------------------------------------------------
    def first_variants(self, options: UpscaleOptions) -> tuple[str, ...]:
        """The UNet weight sets its first pass needs."""
        return ("first",)

    def plan_image(
        self,
        size: tuple[int, int],
        options: UpscaleOptions,
        widths: Widths,
        dtype_bytes: int,
        free_bytes: int,
        host_free_bytes: int | None,
        variants: tuple[str, ...],
    ) -> ImagePlan:
        """How an input of ``size`` goes through its pass: tiles, batches, memory."""
        return plan_image(
            size,
            options,
            widths,
            dtype_bytes,
            free_bytes,
            variants,
            self.tiling,
            host_free_bytes,
            self.default_tiles,
        )

    def default_tiles(self, options: UpscaleOptions, auto: int) -> tuple[int, int]:
        """(tile, overlap) in latent pixels when the options leave them to the family;
        ``auto``: the largest tile the free memory allows."""
        return stablesr_tiles(options, auto)

    def timestep(
        self, flag: int | None, recorded: int | None, steps: int | None, source: str, role: Role
    ) -> tuple[int, str]:
        """(timestep, where it came from); ``steps`` None before the scheduler is read."""
        raise NotImplementedError

    def planned_timestep(self, path: Path, flag: int | None, role: Role) -> tuple[int, str]:
        """The timestep before anything is loaded (headers only): dry run and manifest."""
        return self.timestep(flag, None, None, str(path), role)

    def merged_variant(self, options: UpscaleOptions | None) -> str:
        return self.merged

    def check_options(self, options: UpscaleOptions) -> None:
        """Refuse, with one line, options this family has no use for."""
        if (options.lambda_pix, options.lambda_sem) != DEFAULT_LAMBDAS:
            raise OptionsError(
                f"--lambda-pix/--lambda-sem: only PiSA-SR has lambdas; {self.short} has none"
            )

    def first_pass(self, weights: PassWeights, options: UpscaleOptions, steps: int) -> PassPlan:
        self.check_options(options)
        timestep, _ = self.timestep(
            options.timestep, weights.timestep, steps, weights.source, "first"
        )
        return PassPlan(
            family=self.name,
            variants=("first",),
            timestep=timestep,
            rule="x0",
            options=options,
            tiling=self.tiling,
            planner=self.plan_image,
        )

    def second_pass(
        self, weights: PassWeights, options: UpscaleOptions, steps: int, flag: int | None
    ) -> PassPlan:
        timestep, _ = self.timestep(flag, weights.timestep, steps, weights.source, "second")
        return PassPlan(
            name="second",
            family=self.name,
            variants=("second",),
            timestep=timestep,
            rule="x0",
            options=options,
            tiling=self.tiling,
            encoder="second",
            planner=self.plan_image,
        )

    def repeat_pass(
        self, weights: PassWeights, options: UpscaleOptions, first: PassPlan
    ) -> PassPlan:
        raise OptionsError(
            f"--second-pass pisa needs PiSA-SR weights; with {self.short} use "
            "--second-pass tudsr --second-pass-weights DIR"
        )

    def refuses_second_pass(self, kind: str) -> str:
        return ""

    # --- describing itself -------------------------------------------------------------
    def describe_loaded(self, weights: PassWeights, options: UpscaleOptions, role: Role) -> str:
        flag = options.timestep if role == "first" else options.second_pass.timestep
        steps = None
        timestep, origin = self.timestep(flag, weights.timestep, steps, weights.source, role)
        line = f"{self.title} {weights.source}, timestep {timestep} ({origin})"
        return line if role == "first" else f"second pass: {line}"

    def describe_planned(self, path: Path, options: UpscaleOptions, role: Role) -> str:
        """The dry run's line, before anything is loaded."""
        flag = options.timestep if role == "first" else options.second_pass.timestep
        timestep, origin = self.planned_timestep(path, flag, role)
        line = f"{self.title} {path}, timestep {timestep} ({origin})"
        return f"model: {line}" if role == "first" else f"second pass: {line}"

    def identity(self, path: Path, options: UpscaleOptions, role: Role) -> dict:
        """What the outputs depend on besides the files' digests (the manifest)."""
        flag = options.timestep if role == "first" else options.second_pass.timestep
        return {"timestep": self.planned_timestep(path, flag, role)[0]}

    def doctor(self, path: Path) -> str:
        """`pisa doctor`'s line for these weights (raises PisaError when they are bad)."""
        loaded = self.load(path, "first")
        licence = f"; {self.licence}" if self.licence else ""
        return f"{self.title}: {path} ({loaded.detail}{licence})"

    def refuses_sweep(self) -> str:
        """ "" when `pisa sweep` can run it, else why not (no lambdas)."""
        return f"{self.short} has no lambdas to sweep (they are PiSA-SR's)"
