"""The sweep engine: what it costs (counted), and that each grid point is `pisa upscale`'s
image for its lambdas."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pisa_cli import TileOptions, UpscaleOptions, load_pipeline
from pisa_cli.core.batching import AUTO_IMAGE_BATCH, BatchState
from pisa_cli.core.loading import merged_variant
from pisa_cli.sweep.core import BASIS, Sweeper, blend_basis
from pisa_cli.sweep.grid import GridPoint, parse_grid, plan_options
from tests.builders import noise_image
from tests.fakes import run_on
from tests.helpers import assert_close


def load_as_sweep(tiny_base, pisa_pkl, dtype: str):
    """Loaded as `pisa sweep` loads it: pixel weights merged, PiSA through the side path."""
    pipe = load_pipeline(
        weights=str(pisa_pkl),
        base_model=str(tiny_base),
        device="cpu",
        dtype=dtype,
        options=plan_options(UpscaleOptions()),
    )
    assert pipe.models.unet.merged == "pix"
    return pipe


@pytest.fixture(scope="module")
def sweep_pipeline(tiny_base, pisa_pkl):
    return load_as_sweep(tiny_base, pisa_pkl, "fp32")


class Counter:
    """Counts forward calls of a module and the samples they carried."""

    def __init__(self, module):
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        self.batches.append((args[0] if args else next(iter(kwargs.values()))).shape[0])

    def close(self):
        self.handle.remove()


def count_sweep(pipe, image, options, grid):
    counters = {
        "unet": Counter(pipe.models.unet.unet),
        "encoder": Counter(pipe.models.vae.encoder),
        "decoder": Counter(pipe.models.vae.decoder),
    }
    try:
        sweeper = Sweeper(pipe, options)
        prepared = sweeper.prepare(image)
        images = dict(sweeper.images(prepared, grid.points))
    finally:
        for counter in counters.values():
            counter.close()
    return prepared, images, {name: c.batches for name, c in counters.items()}


TILED = UpscaleOptions(
    process_size=64, tiles=TileOptions(latent_tile=16, latent_overlap=6, tile_batch=2)
)


@pytest.mark.parametrize("spec", ["pix=0,1 sem=1", "pix=0:1:0.25 sem=0,0.6,1.2,1.5"])
def test_encoder_once_and_unet_twice_per_tile_whatever_the_grid(sweep_pipeline, spec):
    grid = parse_grid(spec)
    image = noise_image(64, 48, 1)  # latent 32x24: six 16x16 tiles
    prepared, images, calls = count_sweep(sweep_pipeline, image, TILED, grid)
    tiles = len(prepared.plan.unet.tiles)
    assert tiles == 6
    assert calls["encoder"] == [1]
    # Each tile goes through the UNet exactly twice (pixel and PiSA eps), two tiles per call.
    assert calls["unet"] == [2 * 2] * 3
    assert prepared.unet_calls == 3
    assert sum(calls["decoder"]) == grid.size == len(images) == prepared.decodes
    assert all(image.size == (256, 192) for image in images.values())


def test_one_point_per_decoder_call_on_the_cpu(sweep_pipeline):
    grid = parse_grid("pix=0:1:0.5 sem=0,1")
    _, _, calls = count_sweep(sweep_pipeline, noise_image(40, 32, 2), TILED, grid)
    assert calls["decoder"] == [1] * grid.size


def test_several_points_per_decoder_call_where_memory_allows(sweep_pipeline, monkeypatch):
    # as on an accelerator: as many points as fit, at most AUTO_IMAGE_BATCH (the image batch)
    monkeypatch.setattr(sweep_pipeline.models, "device", torch.device("meta"))
    sweeper = Sweeper(sweep_pipeline, TILED)
    plan = sweep_pipeline.plan((40, 32), sweeper.options)
    assert sweeper.decode_batch_size(plan) == AUTO_IMAGE_BATCH
    tight = dataclasses.replace(plan, free_bytes=plan.free_bytes // 10**6)
    assert sweeper.decode_batch_size(tight) == 1
    asked = Sweeper(sweep_pipeline, TILED, image_batch=3)
    assert asked.decode_batch_size(plan) == 3
    assert asked.decode_batch_size(tight) == 1  # what is asked for, as far as memory holds
    monkeypatch.undo()
    grid = parse_grid("pix=0:1:0.5 sem=0,1")
    prepared = sweeper.prepare(noise_image(40, 32, 2))
    prepared.decode_batch = 4
    counter = Counter(sweep_pipeline.models.vae.decoder)
    try:
        images = dict(sweeper.images(prepared, grid.points))
    finally:
        counter.close()
    assert counter.batches == [4, 2] and len(images) == grid.size


def test_decoder_out_of_memory_halves_the_points_per_call(sweep_pipeline, monkeypatch):
    decode = sweep_pipeline.models.decode
    tried = []
    monkeypatch.setattr(sweep_pipeline, "batch_state", BatchState())  # restored after the test

    def small_memory(latents, *args, **kwargs):
        tried.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return decode(latents, *args, **kwargs)

    monkeypatch.setattr(sweep_pipeline.models, "decode", small_memory)
    grid = parse_grid("pix=0,1 sem=0,1")
    sweeper = Sweeper(sweep_pipeline, TILED)
    prepared = sweeper.prepare(noise_image(40, 32, 3))
    prepared.decode_batch = 4
    images = dict(sweeper.images(prepared, grid.points))
    assert len(images) == 4 and prepared.decode_batch == 1
    assert tried == [4, 2, 1, 1, 1, 1]  # after the second failure, one at a time
    assert any("out of memory with 4 points per call; 2 from now on" in n for n in prepared.notes)
    size = prepared.plan.model_size
    assert sweep_pipeline.batcher.limits == {size: 1}  # the next image starts at what held


@pytest.fixture(scope="module")
def upscale_pipelines(sweep_pipeline, pipeline):
    """`pisa upscale` merges the PiSA weights for equal lambdas, the pixel weights otherwise."""
    return {"pix": sweep_pipeline, "pisa": pipeline}


POINTS = "pix=0.5,1 sem=0,1,1.4"
"""One UNet variant (sem 0), merged PiSA weights (1, 1), both variants (the rest)."""


def upscale_at(pipes, image, options, point):
    options = UpscaleOptions(
        **{**options.__dict__, "lambda_pix": point.pix, "lambda_sem": point.sem}
    )
    return pipes[merged_variant(options)].upscale(image, options)


@pytest.mark.parametrize(("color_fix", "tiles"), [("none", None), ("wavelet", (16, 6))])
def test_points_equal_pisa_upscale_within_2_levels(
    sweep_pipeline, upscale_pipelines, color_fix, tiles
):
    # Points that need one UNet variant (sem 0, equal lambdas) come from a batch of two
    # here and of one in `pisa upscale`: float noise that can flip an 8-bit level.
    tile_options = TileOptions() if tiles is None else TileOptions(*tiles)
    options = UpscaleOptions(process_size=64, color_fix=color_fix, tiles=tile_options)
    image = noise_image(48, 40, 4)
    sweeper = Sweeper(sweep_pipeline, options)
    for point, ours in sweeper.images(sweeper.prepare(image), parse_grid(POINTS).points):
        theirs = upscale_at(upscale_pipelines, image, options, point)
        diff = np.abs(np.asarray(ours, int) - np.asarray(theirs, int))
        assert diff.max() <= 2, (point, diff.max())


@pytest.mark.parametrize("decode_batch", [1, 4])
def test_with_adain_points_stay_within_the_pipeline_bar(
    sweep_pipeline, upscale_pipelines, decode_batch
):
    # adain stretches a flipped level by the contrast ratio of input and output: about 2.2
    # on the tiny random model (about 1 on real weights), so the 3/255 bar of the pipeline
    # tests. A decoder batch (accelerators) adds float noise of its own.
    options = UpscaleOptions(process_size=64)
    image = noise_image(48, 40, 5)
    sweeper = Sweeper(sweep_pipeline, options)
    prepared = sweeper.prepare(image)
    prepared.decode_batch = decode_batch
    for point, ours in sweeper.images(prepared, parse_grid(POINTS).points):
        assert_close(ours, upscale_at(upscale_pipelines, image, options, point))


def test_one_decode_per_call_gives_upscale_bit_for_bit(sweep_pipeline):
    options = UpscaleOptions(process_size=64)
    image = noise_image(40, 32, 6)
    sweeper = Sweeper(sweep_pipeline, options)
    prepared = sweeper.prepare(image)
    prepared.decode_batch = 1
    for point, ours in sweeper.images(prepared, [GridPoint(0.5, 0.7), GridPoint(1.3, 0.2)]):
        theirs = sweep_pipeline.upscale(
            image, UpscaleOptions(process_size=64, lambda_pix=point.pix, lambda_sem=point.sem)
        )
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_the_blend_is_exact_at_the_basis_and_affine_between():
    rng = np.random.default_rng(0)
    basis = {name: rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for name in BASIS}
    for name, point in BASIS.items():
        assert np.array_equal(blend_basis(basis, point.pix, point.sem), basis[name])
    pix, sem = 0.63, 0.21
    expected = (
        (1 - pix) * basis["low"].astype(float)
        + (pix - sem) * basis["pix"].astype(float)
        + sem * basis["pisa"].astype(float)
    )
    blended = blend_basis(basis, pix, sem)
    assert np.abs(blended - expected).max() <= 0.5 + 1e-9
    assert blend_basis(basis, 3.0, -2.0).dtype == np.uint8  # extrapolation clips, no wrap


def test_in_bf16_on_the_cpu_points_are_upscale_s_images_bit_for_bit(tiny_base, pisa_pkl):
    """bf16 kernels round differently with the batch size: the sweep's two-variant batch
    must give one-variant points exactly what `pisa upscale` computes alone."""
    pipe = load_as_sweep(tiny_base, pisa_pkl, "bf16")
    options = UpscaleOptions(process_size=64, color_fix="none")
    image = noise_image(48, 40, 7)
    sweeper = Sweeper(pipe, options)
    points = [GridPoint(1.0, 0.0), GridPoint(1.0, 1.0), GridPoint(0.8, 0.3)]
    for point, ours in sweeper.images(sweeper.prepare(image), points):
        lambdas = {"lambda_pix": point.pix, "lambda_sem": point.sem}
        theirs = pipe.upscale(image, dataclasses.replace(options, **lambdas))
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), point


def test_the_sweep_command_decodes_image_batch_points_per_call(
    sweep_pipeline, tiny_base, pisa_pkl, tmp_path
):
    noise_image(20, 16, 1).save(tmp_path / "one.png")
    model = ["--base-model", tiny_base, "--weights", pisa_pkl, "--device", "cpu"]
    counter = Counter(sweep_pipeline.models.vae.decoder)
    try:
        result = run_on(
            sweep_pipeline, "sweep", tmp_path / "one.png", "-o", tmp_path / "out", *model,
            "--lambda-grid", "pix=0,1 sem=0,1", "--process-size", "64", "--image-batch", "3",
        )  # fmt: skip
    finally:
        counter.close()
    assert result.exit_code == 0, result.output
    assert counter.batches == [3, 1]  # four points, three per call


def test_equal_lambdas_in_low_precision_need_the_model_upscale_loads():
    from types import SimpleNamespace

    from pisa_cli.sweep.core import needs_merged

    def pipe(dtype, merged="pix"):
        models = SimpleNamespace(dtype=dtype, unet=SimpleNamespace(merged=merged))
        return SimpleNamespace(models=models, passes=SimpleNamespace(family="pisa-sr"))

    options = UpscaleOptions()
    equal, apart = [GridPoint(0.5, 0.5)], [GridPoint(1.0, 0.0), GridPoint(1.0, 0.5)]
    assert needs_merged(pipe(torch.bfloat16), options, apart + equal)
    assert needs_merged(pipe(torch.float16), options, equal)
    assert not needs_merged(pipe(torch.bfloat16), options, apart)
    assert not needs_merged(pipe(torch.float32), options, equal)  # float noise only
    assert not needs_merged(pipe(torch.bfloat16, "pisa"), options, equal)
