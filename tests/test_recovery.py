"""Out-of-memory retries with smaller tiles, and fp32 redos of non-finite VAE passes."""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from pisa_cli import load_pipeline
from pisa_cli.engine import vae as vae_module
from pisa_cli.errors import OutOfMemoryError
from pisa_cli.models.device import is_out_of_memory
from pisa_cli.options import TileOptions, UpscaleOptions
from tests.builders import noise_image
from tests.helpers import assert_close

OPTIONS = UpscaleOptions(process_size=64)


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("shapes do not match"))


def refuse_above(monkeypatch, name, limit):
    """Make vae.<name> fail like an allocator would for tiles above ``limit`` (None = whole)."""
    original = getattr(vae_module, name)
    seen = []

    def fake(*args, tile=None, **kwargs):
        seen.append(tile)
        if tile is None or tile > limit:
            raise MemoryError
        return original(*args, tile=tile, **kwargs)

    monkeypatch.setattr(vae_module, name, fake)
    return seen


@pytest.mark.parametrize(("stage", "limit"), [("decode", 8), ("encode", 64)])
def test_vae_out_of_memory_halves_the_tile_and_gives_the_same_image(
    pipeline, monkeypatch, stage, limit
):
    image = noise_image(64, 48, 1)  # latent 32 x 24: whole, then tiles of 16 and 8
    expected = pipeline.upscale(image, OPTIONS)
    seen = refuse_above(monkeypatch, stage, limit)
    result = pipeline.upscale_with_info(image, OPTIONS)
    assert seen[0] is None and seen[-1] <= limit and len(seen) >= 3
    assert all(b < a for a, b in itertools.pairwise(seen[1:]))  # halved each time
    stage_name = "VAE decoder" if stage == "decode" else "VAE encoder"
    assert any(note.startswith(f"{stage_name} out of memory") for note in result.notes)
    assert_close(result.image, expected, mean=0.01)


def test_unet_out_of_memory_lowers_the_batch_then_the_tile(pipeline, monkeypatch):
    import pisa_cli.core.models as models_module

    original = models_module.predict_eps
    tried = []

    def fake(unet, latents, cond, plan, variants, tile_batch=1, timestep=1, **kwargs):
        tried.append((plan.tile_size, tile_batch))
        if tile_batch > 1 or max(plan.tile_size) > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return original(unet, latents, cond, plan, variants, tile_batch, timestep, **kwargs)

    monkeypatch.setattr(models_module, "predict_eps", fake)
    options = replace(OPTIONS, tiles=TileOptions(latent_tile=16, latent_overlap=4, tile_batch=4))
    result = pipeline.upscale_with_info(noise_image(64, 48, 2), options)  # latent 32 x 24
    # the batch halves first (4, 2, 1) at the same tile; only then the tile halves
    assert tried[:3] == [((16, 16), 4), ((16, 16), 2), ((16, 16), 1)], tried
    assert tried[-1] == ((8, 8), 1)
    assert result.plan.unet.tile_size == (8, 8) and result.plan.unet.tiled
    assert sum("UNet out of memory" in note for note in result.notes) == len(tried) - 1


def test_smallest_tile_failing_fails_the_image_clearly(pipeline, monkeypatch):
    refuse_above(monkeypatch, "decode", 0)
    with pytest.raises(OutOfMemoryError, match="out of memory in the VAE decoder even at tile"):
        pipeline.upscale(noise_image(40, 32, 3), OPTIONS)


def test_other_errors_are_not_taken_for_memory(pipeline, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(vae_module, "decode", broken)
    with pytest.raises(ValueError, match="a bug"):
        pipeline.upscale(noise_image(40, 32, 4), OPTIONS)


@pytest.fixture(scope="module")
def bf16_pipeline(tiny_base, pisa_pkl):
    return load_pipeline(
        weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu", dtype="bf16"
    )


def test_non_finite_vae_output_is_redone_in_fp32_and_said_once(bf16_pipeline, caplog):
    decoder_out = bf16_pipeline.models.vae.decoder.conv_out

    def poison(module, args, output):
        return output * float("nan") if output.dtype != torch.float32 else output

    handle = decoder_out.register_forward_hook(poison)
    try:
        with caplog.at_level(logging.WARNING, logger="pisa_cli"):
            first = bf16_pipeline.upscale_with_info(noise_image(40, 32, 5), OPTIONS)
            second = bf16_pipeline.upscale_with_info(noise_image(40, 32, 6), OPTIONS)
    finally:
        handle.remove()
    for result in (first, second):
        assert "VAE decoder gave inf/NaN in bfloat16; redone in fp32" in result.notes
        assert np.asarray(result.image).std() > 0  # a real image, not NaN garbage
    warnings = [r for r in caplog.records if "inf/NaN" in r.getMessage()]
    assert len(warnings) == 1
    assert next(bf16_pipeline.models.vae.parameters()).dtype == torch.bfloat16


# --- GPU allocation failures are out of memory (issue 20.10) ------------------------------

FLAVOURS = [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "CUDA error: out of memory",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
    "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
]
NOT_MEMORY = [
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`",
    "CUDA error: CUBLAS_STATUS_INTERNAL_ERROR when calling `cublasGemmEx( handle, ...)`",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a ...",
    "cuDNN error: CUDNN_STATUS_NOT_INITIALIZED",
    "CUDA error: an illegal memory access was encountered",
]


def flavour(message: str) -> BaseException:
    if message.startswith("CUDA out of memory"):
        return torch.cuda.OutOfMemoryError(message)
    return RuntimeError(message)


def test_gpu_allocation_failures_are_out_of_memory_and_other_gpu_errors_not():
    assert all(is_out_of_memory(flavour(message)) for message in FLAVOURS)
    assert not any(is_out_of_memory(RuntimeError(message)) for message in NOT_MEMORY)


@pytest.mark.parametrize("message", FLAVOURS)
def test_every_allocation_failure_halves_and_retries_each_stage(pipeline, monkeypatch, message):
    """A fake allocator raising ``message`` in each stage: the encoder's and decoder's
    tiles halve, the UNet's tile batch then its tile, as for torch.cuda.OutOfMemoryError."""
    from types import SimpleNamespace

    import pisa_cli.core.recovery as recovery
    from pisa_cli.core.recovery import StageGuard

    monkeypatch.setattr(recovery, "release_memory", lambda: None)  # a full gc costs 0.5 s

    options = replace(OPTIONS, tiles=TileOptions(latent_tile=16, latent_overlap=4, tile_batch=4))
    plan = pipeline.plan((64, 48), options, ("pisa",))  # latent 32 x 24
    guard, notes = StageGuard(pipeline.models.vae, torch.float32), []
    seen: dict[str, list] = {"encode": [], "unet": [], "decode": []}

    def encode(tile, store):
        seen["encode"].append(tile)
        if tile is None or tile > 64:
            raise flavour(message)
        return SimpleNamespace(latents=torch.zeros(1, 4, 32, 24))

    def predict(current):
        seen["unet"].append((current.tile_batch, current.unet.tile_size))
        if current.tile_batch > 1 or max(current.unet.tile_size) > 8:
            raise flavour(message)
        return {"pisa": torch.zeros(1, 4, 32, 24)}

    def decode(tile, store):
        seen["decode"].append(tile)
        if tile is None or tile > 8:
            raise flavour(message)
        return torch.zeros(1, 3, 256, 192)

    _encoded, after = guard.encode(encode, plan, notes)
    assert seen["encode"] == [None, 128, 64] and after.encoder_tile == 64
    _eps, after = guard.predict(predict, plan, notes)
    assert [b for b, _tile in seen["unet"]] == [4, 2, 1, 1] and after.unet.tile_size == (8, 8)
    _decoded, after = guard.decode(decode, plan, notes)
    assert seen["decode"] == [None, 16, 8] and after.decoder_tile == 8
    assert len(notes) == 7 and all("out of memory" in note for note in notes)


@pytest.mark.parametrize("message", FLAVOURS)
def test_every_allocation_failure_halves_an_image_batch(pipeline, monkeypatch, message):
    import pisa_cli.core.recovery as recovery
    from pisa_cli.core.batching import Batcher, Member

    monkeypatch.setattr(recovery, "release_memory", lambda: None)
    batcher = Batcher(pipeline)
    stage = pipeline.stages(OPTIONS)[0]
    members = [Member(noise_image(24, 20, seed)) for seed in range(2)]
    group = [(member, batcher.plan(member.image, stage)) for member in members]
    calls: list[int] = []

    def together(chunk, _stage, _first):
        calls.append(len(chunk))
        raise flavour(message)

    monkeypatch.setattr(batcher, "together", together)
    monkeypatch.setattr(batcher, "alone", lambda member, _stage: calls.append(1))
    batcher.run(group, stage, True, 2)
    assert calls == [2, 1, 1]  # the pair, then each image alone
    assert members[0].notes == ["out of memory with 2 images per call; 1 from now on"]
    assert batcher.limits == {group[0][1].model_size: 1}


# --- a failed attempt is gone before memory is released (issue 20.9) ------------------------


def _plan(pipe):
    return pipe.plan((40, 32), OPTIONS, ("pisa",))


def test_a_failed_attempt_is_gone_before_the_release_and_the_retry(pipeline, monkeypatch):
    import gc
    import weakref

    import pisa_cli.core.recovery as recovery

    held: list[weakref.ref] = []
    released: list[bool] = []

    def release():  # no gc.collect: a tensor let go is freed at once
        released.append(all(ref() is None for ref in held))

    def decode(tile, store):
        assert all(ref() is None for ref in held), "the failed attempt is still in memory"
        activations = torch.ones(64, 64)  # held by this frame, so by the traceback
        held.append(weakref.ref(activations))
        raise RuntimeError(FLAVOURS[2])

    monkeypatch.setattr(recovery, "release_memory", release)
    guard = recovery.StageGuard(pipeline.models.vae, torch.float32)
    with pytest.raises(OutOfMemoryError) as failure:
        guard.decode(decode, _plan(pipeline), [])
    assert len(held) >= 2 and released and all(released)
    error = failure.value  # kept, as a runner keeps it: it keeps no attempt alive
    gc.collect()
    assert error.__context__ is None and error.__cause__ is None
    assert all(ref() is None for ref in held)


def test_a_low_precision_result_is_gone_before_its_fp32_redo(pipeline):
    import gc
    import weakref

    from pisa_cli.core.recovery import StageGuard

    model = torch.nn.Linear(1, 1).to(torch.bfloat16)  # the model upcast for the redo
    held: list[weakref.ref] = []

    def decode(tile, store):
        if next(model.parameters()).dtype == torch.bfloat16:
            out = torch.full((1, 3, 8, 8), float("nan"))
            held.append(weakref.ref(out))
            return out
        gc.collect()
        assert held and held[0]() is None, "the NaN result is kept through the redo"
        return torch.zeros(1, 3, 8, 8)

    guard = StageGuard(model, torch.bfloat16)
    decoded, _plan_run = guard.decode(decode, _plan(pipeline), [])
    assert decoded.eq(0).all() and next(model.parameters()).dtype == torch.bfloat16


def test_a_batch_keeps_its_failed_images_errors_without_their_tensors(monkeypatch):
    import gc
    import weakref

    from pisa_cli.core.random import random_pipeline

    pipe = random_pipeline("tiny", torch.device("cpu"), torch.float32)
    held: list[weakref.ref] = []

    def failing(latents, *args):  # the batch fails, then each image alone
        activations = torch.ones(256, 256)  # in the failing frame
        held.append(weakref.ref(activations))
        raise ValueError("a bug")

    images = [noise_image(24, 20, seed) for seed in range(3)]
    monkeypatch.setattr(pipe.models, "predict", failing)
    results = pipe.upscale_many(images, OPTIONS, 3)
    gc.collect()
    assert len(held) == 4 and all(isinstance(result, ValueError) for result in results)
    assert all(result.__traceback__ is None for result in results)
    assert all(ref() is None for ref in held), "a stored error keeps its image's tensors"


def test_an_fp32_redo_out_of_memory_is_let_go_before_converting_back_and_halves(
    pipeline, monkeypatch
):
    """fp32 activations are twice the size: the redo is where memory runs out; converting
    the model back needs memory its traceback would hold."""
    import weakref

    import pisa_cli.core.recovery as recovery
    from pisa_cli.core.recovery import StageGuard

    monkeypatch.setattr(recovery, "release_memory", lambda: None)
    model = torch.nn.Linear(1, 1).to(torch.bfloat16)
    to, held, at_restore, tiles = model.to, [], [], []

    def tracked_to(*args, dtype=None, **kwargs):
        if dtype == torch.bfloat16:
            at_restore.append(all(ref() is None for ref in held))
        return to(*args, dtype=dtype, **kwargs)

    def decode(tile, store):
        tiles.append(tile)
        if next(model.parameters()).dtype == torch.bfloat16:
            return torch.full((1, 3, 8, 8), float("nan"))
        if tile is None:  # the fp32 redo of the whole latent does not fit
            activations = torch.ones(64, 64)
            held.append(weakref.ref(activations))
            raise RuntimeError(FLAVOURS[3])
        return torch.zeros(1, 3, 8, 8)

    monkeypatch.setattr(model, "to", tracked_to)
    notes: list[str] = []
    decoded, plan = StageGuard(model, torch.bfloat16).decode(decode, _plan(pipeline), notes)
    assert tiles[:2] == [None, None] and tiles[2] is not None and plan.decoder_tile == tiles[2]
    assert at_restore and all(at_restore), "the fp32 run's tensors held while converting back"
    assert decoded.eq(0).all() and next(model.parameters()).dtype == torch.bfloat16
    assert any("VAE decoder out of memory at the whole latent" in note for note in notes)


# --- the one halving-retry loop (issue 21.3) ------------------------------------------------


def test_retry_halving_halves_on_memory_and_hands_back_other_failures(monkeypatch):
    import pisa_cli.core.recovery as recovery
    from pisa_cli.core.recovery import Failure, NotFinite, retry_halving

    released: list[int] = []
    monkeypatch.setattr(recovery, "release_memory", lambda: released.append(1))

    tried: list[int] = []

    def run(size):
        tried.append(size)
        if size > 2:
            raise RuntimeError(FLAVOURS[0])
        return f"held at {size}"

    halved: list[int] = []

    def halve(size):
        halved.append(size)
        return size // 2

    assert retry_halving(run, 8, halve) == ("held at 2", 2)
    assert tried == [8, 4, 2] and halved == [8, 4] and len(released) == 2
    assert retry_halving(run, 8, lambda size: None) == (Failure.MEMORY, 8)  # nothing smaller

    def overflow(_size):
        raise NotFinite("UNet")

    def bug(_size):
        raise ValueError("a bug")

    caught = frozenset(Failure)
    assert retry_halving(overflow, 4, halve, caught) == (Failure.NOT_FINITE, 4)
    seen: list[tuple[str, int]] = []
    outcome = retry_halving(bug, 4, halve, caught, lambda e, size: seen.append((str(e), size)))
    assert outcome == (Failure.ERROR, 4) and seen == [("a bug", 4)]
    with pytest.raises(ValueError):  # not a failure it recovers from: raised as it is
        retry_halving(bug, 4, halve)
    with pytest.raises(NotFinite):
        retry_halving(overflow, 4, halve)
