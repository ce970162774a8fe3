"""Stages that recover: smaller tiles when memory runs out, fp32 when fp16 overflows.

An out-of-memory error (CUDA, MPS or the CPU allocator) in a stage halves that stage's tile
(the UNet first halves its tile batch) and runs the stage again; only when the smallest
tile fails does the image fail. A VAE pass in fp16 or bf16 that gives inf or NaN is redone
in fp32, with a warning the first time. Every change is logged and noted in the result.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from pisa_cli.core.planning import ImagePlan
from pisa_cli.engine.tiles import plan_tiles
from pisa_cli.errors import OutOfMemoryError
from pisa_cli.models.device import empty_caches, is_out_of_memory
from pisa_cli.options import MIN_LATENT_TILE, MIN_VAE_DECODER_TILE, MIN_VAE_ENCODER_TILE

log = logging.getLogger(__name__)


def release_memory() -> None:
    gc.collect()
    empty_caches()


def overflowed(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a pass in ``dtype`` (fp16 or bf16; fp32 never counts) gave inf or NaN."""
    return dtype != torch.float32 and not bool(torch.isfinite(tensor).all())


class StageGuard:
    """Runs the encode, UNet and decode stages of one image with recovery. Each stage is
    given as a callable of its tile sizes; the guard knows no pipeline."""

    def __init__(self, vae: torch.nn.Module, dtype: torch.dtype):
        self.vae = vae
        self.dtype = dtype
        self.upcast_warned = False

    # --- the three stages -----------------------------------------------------------------
    def encode(
        self,
        encode: Callable[[int | None, str], Any],
        plan: ImagePlan,
        notes: list[str],
        vae: torch.nn.Module | None = None,
    ) -> tuple[Any, ImagePlan]:
        """``encode(tile, store)`` (returning an object with ``latents``), retried with
        halved tiles; ``vae``: the model it runs, upcast for an fp32 redo (default: ours)."""

        def run(current: ImagePlan):
            return self._finite(
                "VAE encoder",
                lambda: encode(current.encoder_tile, current.store),
                lambda out: out.latents,
                notes,
                vae,
            )

        def shrink(current: ImagePlan) -> ImagePlan | None:
            side = max(current.model_size) if current.encoder_tile is None else current.encoder_tile
            if side // 2 < MIN_VAE_ENCODER_TILE:
                return None
            return replace(current, encoder_tile=side // 2, store="disk")

        return self._retry("VAE encoder", plan, run, shrink, _encoder_tile, notes)

    def predict(
        self, predict: Callable[[ImagePlan], Any], plan: ImagePlan, notes: list[str]
    ) -> tuple[Any, ImagePlan]:
        """``predict(plan)`` (the UNet over the plan's tiles, its tile batch per call),
        retried with half the tile batch, then half the tile."""

        def shrink(current: ImagePlan) -> ImagePlan | None:
            if current.tile_batch > 1:
                return replace(current, tile_batch=current.tile_batch // 2)
            tile = min(current.latent_tile, max(current.unet.tile_size)) // 2
            if tile < MIN_LATENT_TILE:
                return None
            share = 2 if current.tiling == "omgsr" else 3  # the family's overlap of a tile
            overlap = min(current.latent_overlap, tile // share)
            height, width = current.latent_size
            tiles = plan_tiles(height, width, tile, overlap, current.tiling)
            return replace(current, unet=tiles, latent_tile=tile, latent_overlap=overlap)

        return self._retry("UNet", plan, predict, shrink, _unet_tile, notes)

    def decode(
        self, decode: Callable[[int | None, str], Any], plan: ImagePlan, notes: list[str]
    ) -> tuple[Any, ImagePlan]:
        """``decode(tile, store)`` (a tensor), retried with halved tiles, redone in fp32 when
        a low precision gives inf or NaN."""

        def run(current: ImagePlan):
            return self._finite(
                "VAE decoder",
                lambda: decode(current.decoder_tile, current.store),
                lambda out: out,
                notes,
            )

        def shrink(current: ImagePlan) -> ImagePlan | None:
            side = (
                max(current.latent_size) if current.decoder_tile is None else current.decoder_tile
            )
            if side // 2 < MIN_VAE_DECODER_TILE:
                return None
            return replace(current, decoder_tile=side // 2, store="disk")

        return self._retry("VAE decoder", plan, run, shrink, _decoder_tile, notes)

    # --- machinery ------------------------------------------------------------------------
    @staticmethod
    def _retry(
        stage: str,
        plan: ImagePlan,
        run: Callable[[ImagePlan], Any],
        shrink: Callable[[ImagePlan], ImagePlan | None],
        describe: Callable[[ImagePlan], str],
        notes: list[str],
    ) -> tuple[Any, ImagePlan]:
        while True:
            try:
                return run(plan), plan
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                smaller = shrink(plan)
                release_memory()
                if smaller is None:
                    raise OutOfMemoryError(
                        f"out of memory in the {stage} even at {describe(plan)}; free memory "
                        "on the device or upscale a smaller image"
                    ) from None
                note = f"{stage} out of memory at {describe(plan)}; retried at {describe(smaller)}"
                log.warning(note)
                notes.append(note)
                plan = smaller

    def _finite(
        self,
        stage: str,
        run: Callable[[], Any],
        tensor_of: Callable[[Any], torch.Tensor],
        notes: list[str],
        vae: torch.nn.Module | None = None,
    ) -> Any:
        result = run()
        if not overflowed(tensor_of(result), self.dtype):
            return result
        name = str(self.dtype).removeprefix("torch.")
        note = f"{stage} gave inf/NaN in {name}; redone in fp32"
        if not self.upcast_warned:
            log.warning("%s (said once per run)", note)
            self.upcast_warned = True
        notes.append(note)
        with self._vae_in(torch.float32, vae or self.vae):
            return run()

    @contextlib.contextmanager
    def _vae_in(self, dtype: torch.dtype, vae: torch.nn.Module) -> Iterator[None]:
        vae.to(dtype=dtype)
        try:
            yield
        finally:
            vae.to(dtype=self.dtype)


def _encoder_tile(plan: ImagePlan) -> str:
    if plan.encoder_tile is None:
        return "the whole image"
    return f"tile {plan.encoder_tile} px"


def _decoder_tile(plan: ImagePlan) -> str:
    if plan.decoder_tile is None:
        return "the whole latent"
    return f"tile {plan.decoder_tile} latent px"


def _unet_tile(plan: ImagePlan) -> str:
    height, width = plan.unet.tile_size
    return f"tile {height}x{width}, {plan.tile_batch} per call"
