"""Stages that recover: smaller tiles when memory runs out, fp32 when fp16 overflows.

An out-of-memory error (CUDA, MPS or the CPU allocator) in a stage halves that stage's tile
(the UNet first halves its tile batch) and runs the stage again; only when the smallest
tile fails does the image fail. A VAE pass in fp16 or bf16 that gives inf or NaN is redone
in fp32, with a warning the first time; so is a UNet pass whose eps is not finite. A stage
still not finite in fp32 fails the image (NonFiniteError: damaged weights). Every change is
logged and noted in the result.

A failed attempt is let go before the memory is released and the stage retried: its
exception (and the traceback that holds its tensors) is gone by then, and the error raised
in its place carries no context.

``retry_halving`` is the one loop that does this, for a stage's tiles here and for the
images (or sweep points) per call of ``batching``; ``Failure`` names why an attempt failed.
"""

from __future__ import annotations

import enum
import gc
import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

import torch

from pisa_cli.core.planning import ImagePlan
from pisa_cli.engine.tiles import plan_tiles
from pisa_cli.errors import NonFiniteError, OutOfMemoryError
from pisa_cli.models.device import empty_caches, is_out_of_memory
from pisa_cli.options import MIN_LATENT_TILE, MIN_VAE_DECODER_TILE, MIN_VAE_ENCODER_TILE

log = logging.getLogger(__name__)


State = TypeVar("State")
Result = TypeVar("Result")


class Failure(enum.Enum):
    """Why an attempt failed, as ``retry_halving`` reports it."""

    MEMORY = "memory"
    """Out of memory (CUDA, MPS or the CPU allocator): retried smaller."""
    NOT_FINITE = "not finite"
    """A batched call gave inf or NaN (``NotFinite``): its items are run alone, where the
    stage that overflows is redone in fp32."""
    ERROR = "error"
    """Any other error of a batched call: its items are run alone, so only the guilty fails."""


class NotFinite(Exception):
    """A batched pass gave inf or NaN: its images are run alone, where the stage that
    overflows is redone in fp32 (or the image fails, in fp32 already)."""


MEMORY_ONLY = frozenset({Failure.MEMORY})


def release_memory() -> None:
    gc.collect()
    empty_caches()


def retry_halving(
    run: Callable[[State], Result],
    state: State,
    halve: Callable[[State], State | None],
    caught: frozenset[Failure] = MEMORY_ONLY,
    on_error: Callable[[Exception, State], None] | None = None,
) -> tuple[Result | Failure, State]:
    """``run(state)`` until it holds: (its result, the state it held at). Out of memory
    runs it again at ``halve(state)`` (which notes the change, or raises when nothing
    smaller is worth trying); ``halve`` giving None, or a failure of another kind in
    ``caught``, ends it: (the failure, the state that failed). Failures not in ``caught``
    raise. ``on_error(error, state)`` sees an ERROR before it is let go (keep no reference to it).

    Every failure is let go before the memory is released (out of the except block, its
    traceback and the tensors it holds are gone), and before ``halve`` runs."""
    while True:
        outcome = _attempt(run, state, caught, on_error)
        if not isinstance(outcome, Failure):
            return outcome, state
        release_memory()
        smaller = halve(state) if outcome is Failure.MEMORY else None
        if smaller is None:
            return outcome, state
        state = smaller


def _attempt(
    run: Callable[[State], Result],
    state: State,
    caught: frozenset[Failure],
    on_error: Callable[[Exception, State], None] | None,
) -> Result | Failure:
    """``run(state)``, or the kind of its failure (when in ``caught``; else it raises)."""
    try:
        return run(state)
    except NotFinite:
        if Failure.NOT_FINITE not in caught:
            raise
        return Failure.NOT_FINITE
    except Exception as error:
        kind = Failure.MEMORY if is_out_of_memory(error) else Failure.ERROR
        if kind not in caught:
            raise
        if kind is Failure.ERROR and on_error is not None:
            on_error(error, state)
        return kind


def finite(*tensors: torch.Tensor) -> bool:
    """Whether every value of ``tensors`` is finite (no inf, no NaN)."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


class StageGuard:
    """Runs the encode, UNet and decode stages of one image with recovery. Each stage is
    given as a callable of its tile sizes; the guard knows no pipeline."""

    def __init__(self, vae: torch.nn.Module, dtype: torch.dtype, unet: Any = None):
        self.vae = vae
        self.unet = unet
        """The UNet (anything with ``.to(dtype=...)``) upcast for an fp32 redo of its pass."""
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
        """``encode(tile, store)`` (returning an ``Encoded``), retried with halved tiles;
        ``vae``: the model it runs, upcast for an fp32 redo (default: ours). The latents of
        a redo are handed on in the compute dtype, as the UNet expects them."""

        def run(current: ImagePlan):
            return self._finite(
                "VAE encoder",
                lambda: encode(current.encoder_tile, current.store),
                lambda out: [out.latents],
                notes,
                vae or self.vae,
                lambda out: replace(out, latents=out.latents.to(self.dtype)),
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
        """``predict(plan)`` (the UNet over the plan's tiles, its tile batch per call: a
        dict of float32 eps), retried with half the tile batch, then half the tile; redone
        in fp32 when a low precision gives inf or NaN."""

        def run(current: ImagePlan):
            unet = self.unet
            return self._finite("UNet", lambda: predict(current), dict.values, notes, unet)

        def shrink(current: ImagePlan) -> ImagePlan | None:
            if current.tile_batch > 1:
                return replace(current, tile_batch=current.tile_batch // 2)
            if current.tiling == "windows":
                return None  # its window is the model's patch_size: never shrunk
            tile = min(current.latent_tile, max(current.unet.tile_size)) // 2
            if tile < MIN_LATENT_TILE:
                return None
            share = 2 if current.tiling == "square" else 3  # the grid's overlap of a tile
            overlap = min(current.latent_overlap, tile // share)
            height, width = current.latent_size
            tiles = plan_tiles(height, width, tile, overlap, current.tiling)
            return replace(current, unet=tiles, latent_tile=tile, latent_overlap=overlap)

        return self._retry("UNet", plan, run, shrink, _unet_tile, notes)

    def decode(
        self, decode: Callable[[int | None, str], Any], plan: ImagePlan, notes: list[str]
    ) -> tuple[Any, ImagePlan]:
        """``decode(tile, store)`` (a float32 tensor), retried with halved tiles, redone in
        fp32 when a low precision gives inf or NaN."""

        def run(current: ImagePlan):
            return self._finite(
                "VAE decoder",
                lambda: decode(current.decoder_tile, current.store),
                lambda out: [out],
                notes,
                self.vae,
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
        def halve(current: ImagePlan) -> ImagePlan:
            smaller = shrink(current)
            if smaller is None:
                raise OutOfMemoryError(
                    f"out of memory in the {stage} even at {describe(current)}; free memory "
                    "on the device or upscale a smaller image"
                )
            note = f"{stage} out of memory at {describe(current)}; retried at {describe(smaller)}"
            log.warning(note)
            notes.append(note)
            return smaller

        return retry_halving(run, plan, halve)  # halve raises rather than give up

    def _finite(
        self,
        stage: str,
        run: Callable[[], Any],
        tensors_of: Callable[[Any], Iterable[torch.Tensor]],
        notes: list[str],
        model: Any,
        handed_on: Callable[[Any], Any] = lambda out: out,
    ) -> Any:
        """``run()``, checked finite; in a low precision redone once in fp32 (``model``
        upcast for it); ``handed_on`` makes a redo's result what the next stage expects."""
        result = run()
        if finite(*tensors_of(result)):
            return result
        del result  # not kept through the redo
        if self.dtype == torch.float32 or model is None:
            raise NonFiniteError(_damaged(stage))
        name = str(self.dtype).removeprefix("torch.")
        note = f"{stage} gave inf/NaN in {name}; redone in fp32"
        if not self.upcast_warned:
            log.warning("%s (said once per run)", note)
            self.upcast_warned = True
        notes.append(note)
        result = handed_on(self._in_fp32(stage, run, model))
        if not finite(*tensors_of(result)):
            raise NonFiniteError(_damaged(stage))
        return result

    def _in_fp32(self, stage: str, run: Callable[[], Any], model: Any) -> Any:
        """``run()`` with ``model`` in fp32, the model back in the compute dtype after it
        however it ends. Out of memory in the run is let go before the model converts back
        (its activations would hold the memory that conversion needs) and raised anew, for
        ``_retry`` to halve the tile; out of memory converting fails the image."""
        converted = False
        try:
            converted = _converted(model, torch.float32)
            if converted:
                try:
                    return run()
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
        finally:  # a second try after the first released what it could
            if not (_converted(model, self.dtype) or _converted(model, self.dtype)):
                log.error(
                    "out of memory converting the %s back from fp32: later images may fail; "
                    "run with --dtype fp32",
                    stage,
                )
        if not converted:
            raise OutOfMemoryError(
                f"out of memory converting the {stage} to fp32 to redo its pass; free "
                "memory on the device or use --dtype fp32"
            )
        raise MemoryError(f"out of memory in the fp32 redo of the {stage}")


def _converted(model: Any, dtype: torch.dtype) -> bool:
    """``model`` converted to ``dtype``; False when memory ran out part way (its exception
    let go, the memory released)."""
    try:
        model.to(dtype=dtype)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
    else:
        return True
    release_memory()
    return False


def _damaged(stage: str) -> str:
    return (
        f"the {stage} gave inf/NaN even in fp32: the weights are likely damaged (NaN or "
        "huge values, e.g. in a LoRA)"
    )


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
