"""OMGSR-style adapter folders (github wuer5/OMGSR, REFERENCE section 9): a UNet LoRA and
a VAE-encoder LoRA at one mid timestep (default 273, or the one the folder records), the
DDPM x0 rule, OMGSR-S's square latent tiles (tile = process_size / 8, half overlap),
colour fix on the 8-bit output. TUDSR's two serial LoRAs have this layout too, so a folder
also serves as the x2 second pass.

Recognised from the folder's layout (its two peft adapter folders); read as JSON configs
and safetensors, never unpickled (``omgsr_folder``).
"""

from __future__ import annotations

from pathlib import Path

from pisa_cli.core.families.base import Family, LoadedWeights
from pisa_cli.core.families.omgsr_folder import (
    AdapterFolder,
    load_adapter_folder,
    planned_timestep,
    resolve_timestep,
)
from pisa_cli.core.passes import Role
from pisa_cli.models.checkpoint import is_adapter_folder
from pisa_cli.models.lora import UnetAdapter
from pisa_cli.options import UpscaleOptions

FLAGS = {"first": "--timestep", "second": "--second-pass-timestep"}


class Omgsr(Family):
    name = "omgsr"
    title = "OMGSR-style (UNet + VAE-encoder LoRA, mid timestep)"
    short = "an OMGSR-style adapter folder"
    summary = "UNet + VAE-encoder LoRA at a mid timestep (OMGSR-S, TUDSR); first or x2 pass"
    roles = ("first", "second")
    tiling = "square"

    def recognises(self, path: Path, role: Role) -> bool:
        return bool(str(path)) and is_adapter_folder(path)

    def load(self, path: Path, role: Role) -> LoadedWeights:
        return self._weights(load_adapter_folder(path), role)

    def _weights(self, folder: AdapterFolder, role: Role) -> LoadedWeights:
        unet = {role: UnetAdapter(folder.unet, folder.unet_source)}
        encoder = UnetAdapter(folder.encoder, folder.encoder_source)
        return LoadedWeights(self, folder.source, unet, encoder, folder.timestep, folder.describe())

    def random_weights(self, parts, seed: int) -> LoadedWeights:
        from pisa_cli.models.synthetic import random_lora_layers

        folder = AdapterFolder(
            unet=tuple(random_lora_layers(parts.unet, 8, seed=seed)),
            encoder=tuple(random_lora_layers(parts.vae.encoder, 4, seed=seed + 1)),
            timestep=273,
            source="random OMGSR-style folder",
        )
        return self._weights(folder, "first")

    def timestep(self, flag, recorded, steps, source, role) -> tuple[int, str]:
        return resolve_timestep(flag, recorded, steps, source, FLAGS[role])

    def planned_timestep(self, path: Path, flag: int | None, role: Role) -> tuple[int, str]:
        return planned_timestep(path, flag, FLAGS[role])

    def default_tiles(self, options: UpscaleOptions, auto: int) -> tuple[int, int]:
        """Its script's: process_size // 8 (or what memory allows) and half the tile."""
        tiles = options.tiles
        tile = tiles.latent_tile or min(max(1, options.process_size // 8), auto)
        overlap = tile // 2 if tiles.latent_overlap is None else tiles.latent_overlap
        return tile, overlap

    def identity(self, path: Path, options: UpscaleOptions, role: Role) -> dict:
        if role == "first":
            return {"timestep": self.planned_timestep(path, options.timestep, role)[0]}
        flag = options.second_pass.timestep
        timestep = self.planned_timestep(path, flag, role)[0]
        return {"second_pass_family": self.name, "second_pass_timestep": timestep}

    def doctor(self, path: Path) -> str:
        loaded = self.load(path, "first")
        timestep, origin = self.timestep(None, loaded.timestep, None, str(path), "first")
        return f"{self.title}: {path} ({loaded.detail}, timestep {timestep} ({origin}))"

    def refuses_sweep(self) -> str:
        return f"{self.short} has no lambdas to sweep (they are PiSA-SR's)"
