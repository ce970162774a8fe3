"""The whole pipeline with its models on an accelerator, on a CPU-only machine.

``tests/fakedevice.py`` makes a stand-in device whose tensors are CPU tensors that refuse,
as a GPU does, to meet a CPU tensor in one operation (and, as MPS, refuse float64). The
pipeline is built through the real loading path onto it and runs every mode; a tensor left
on the wrong side raises here as it would on the GPU. Outputs are compared to the CPU's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pisa_cli import load_pipeline
from pisa_cli.core import loading
from pisa_cli.core import pipeline as pipeline_module
from pisa_cli.engine import vae
from pisa_cli.imaging.deep import DeepImage
from pisa_cli.models import cache
from pisa_cli.options import SecondPassOptions, TileOptions, UpscaleOptions
from pisa_cli.sweep.core import Sweeper
from pisa_cli.sweep.grid import GridPoint
from tests.builders import noise_image, ramp16
from tests.fakedevice import DeviceMismatch, NoFloat64, is_on_device, on_fake_device

BASE = UpscaleOptions(process_size=64)
TILED_VAE = TileOptions(vae_encoder_tile=64, vae_decoder_tile=8)


def _load(weights, base, **kwargs):
    return load_pipeline(weights=str(weights), base_model=str(base), dtype="fp32", **kwargs)


@pytest.fixture(scope="module")
def on_device(tiny_base, pisa_pkl, pipeline):
    """(device pipelines by name, the CPU pipeline), the stand-in device active meanwhile."""
    save = cache.save_tensors

    def save_on_host(kind, key, tensors, keep=0):
        # safetensors reads a tensor's storage pointer, which the stand-in's tensors lack
        # (a real GPU's have one): hand it the values on the host.
        save(kind, key, {name: value.cpu() for name, value in tensors.items()}, keep)

    with on_fake_device() as device, pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "resolve_device", lambda spec="auto": device)
        patch.setattr(cache, "save_tensors", save_on_host)
        pipes = {"pisa": _load(pisa_pkl, tiny_base)}
        yield pipes, pipeline
    del pipes


def _pipe(on_device, name, request):
    """The device pipeline ``name`` (pisa, omgsr: an adapter folder, tudsr: with a
    second-pass LoRA), loaded on first use."""
    pipes, _ = on_device
    if name not in pipes:
        base = request.getfixturevalue("tiny_base")
        if name == "omgsr":
            pipes[name] = _load(request.getfixturevalue("adapter_folder"), base)
        else:
            lora = str(request.getfixturevalue("second_lora"))
            options = UpscaleOptions(second_pass=SecondPassOptions("tudsr", lora))
            pipes[name] = _load(request.getfixturevalue("pisa_pkl"), base, options=options)
    return pipes[name]


def _levels(image) -> np.ndarray:
    if isinstance(image, DeepImage):
        return image.to_array() * 255
    return np.asarray(image, dtype=np.float64)


def test_the_stand_in_device_refuses_what_a_gpu_refuses():
    with on_fake_device() as device:
        on = torch.ones(4, device=device)
        assert is_on_device(on) and on.device.type == device.type
        with pytest.raises(DeviceMismatch):
            _ = on + torch.ones(4)
        assert float((on * torch.tensor(2.0)).sum().cpu()) == 8.0  # a 0-d CPU scalar is fine
        with pytest.raises(NoFloat64):
            on.double()
        assert not is_on_device(on.cpu()) and on.cpu().sum() == 4


MODES = {
    # name: (pipeline, options, input, slow)
    "default": ("pisa", BASE, "rgb", False),
    "tiled-vae-adain": ("pisa", UpscaleOptions(process_size=64, tiles=TILED_VAE), "rgb", False),
    "tiled-vae-wavelet": (
        "pisa",
        UpscaleOptions(process_size=64, tiles=TILED_VAE, color_fix="wavelet"),
        "rgb",
        True,
    ),
    "tiled-vae-disk-planes": (
        "pisa",
        UpscaleOptions(process_size=64, tiles=TILED_VAE),
        "disk",
        True,
    ),
    "adjustable-latent-tiles-no-colour-fix": (
        "pisa",
        UpscaleOptions(
            process_size=128,
            lambda_pix=0.7,
            lambda_sem=1.3,
            color_fix="none",
            tiles=TileOptions(latent_tile=16, latent_overlap=4, tile_batch=2),
        ),
        "rgb",
        True,
    ),
    "vae-sample-16-bit": (
        "pisa",
        UpscaleOptions(process_size=64, vae_sample=True, seed=3),
        "deep",
        True,
    ),
    "second-pass-pisa": (
        "pisa",
        UpscaleOptions(process_size=64, second_pass=SecondPassOptions("pisa")),
        "rgb",
        True,
    ),
    "omgsr-folder": ("omgsr", BASE, "rgb", True),
}


def _input(kind: str):
    """A 24x20 noise image; "deep": a 16-bit one."""
    if kind == "deep":
        return DeepImage.from_array(ramp16(24, 20, 3) / 65535.0)
    return noise_image(24, 20, 1)


@pytest.mark.parametrize(
    "mode",
    [pytest.param(m, marks=[pytest.mark.slow] if MODES[m][3] else []) for m in MODES],
)
def test_every_mode_runs_on_the_device(on_device, mode, request, monkeypatch):
    name, options, kind, _ = MODES[mode]
    pipe = _pipe(on_device, name, request)
    if kind == "disk":  # no host RAM to spare: the planes go to temporary files
        monkeypatch.setattr(pipeline_module, "host_free_memory", lambda device: 0)
    assert is_on_device(next(pipe.models.unet.unet.parameters()))
    result = pipe.upscale_with_info(_input(kind), options)
    if mode == "default":  # the same image as on the CPU (same weights)
        cpu = on_device[1].upscale(_input(kind), options)
        assert np.array_equal(_levels(result.image), _levels(cpu))
    levels = _levels(result.image)
    assert levels.std() > 1, "a flat image: the pass did nothing"
    if options.tiles.vae_decoder_tile:
        assert result.plan.decoder_tile == 8 and result.plan.encoder_tile == 64
        assert result.plan.store == ("disk" if kind == "disk" else "ram")


@pytest.mark.slow
def test_image_batches_and_sweep_points_run_on_the_device(on_device, request):
    pipe = _pipe(on_device, "pisa", request)
    images = [noise_image(24, 20, seed) for seed in (1, 2, 3)]
    results = pipe.upscale_many(images, BASE, 3)
    assert all(not isinstance(r, BaseException) for r in results), results
    assert [r.batch for r in results] == [3, 3, 3]
    sweeper = Sweeper(pipe, UpscaleOptions(process_size=64, tiles=TILED_VAE), image_batch=2)
    prepared = sweeper.prepare(images[0])
    points = [GridPoint(0.5, 1.0), GridPoint(1.0, 0.5)]
    finished = list(sweeper.images(prepared, points))
    assert [point for point, _ in finished] == points


@pytest.mark.slow
def test_second_pass_lora_runs_on_the_device(on_device, request, second_lora):
    pipe = _pipe(on_device, "tudsr", request)
    second = SecondPassOptions("tudsr", str(second_lora), timestep=200)
    options = UpscaleOptions(process_size=64, second_pass=second)
    result = pipe.upscale_with_info(noise_image(16, 16, 4), options)
    assert result.image.size == (128, 128)


@pytest.mark.parametrize("float64", [False, True], ids=["mps", "cuda"])
@pytest.mark.parametrize(
    "tile", [pytest.param(None, marks=pytest.mark.slow), 8], ids=["whole", "tiled"]
)
def test_the_decoded_image_stays_on_the_device(pipeline, float64, tile):
    """Bug: the tiled decoder built its image on the CPU, and the colour fix then met its
    reference on the GPU ("Expected all tensors to be on the same device")."""
    latents = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(0))
    with on_fake_device(float64=float64) as device, torch.inference_mode():
        model = copy.deepcopy(pipeline.models.vae).to(device)
        image = vae.decode(model, latents.to(device), tile=tile)
        assert is_on_device(image)
        moments = vae.encode(model, image, tile=None if tile is None else 64)
        assert is_on_device(moments)


@pytest.mark.slow
def test_the_fp32_redo_runs_on_the_device(on_device, request):
    """A bf16 decoder giving NaN is redone in fp32: the VAE converted and back, on the device."""
    pipes, _ = on_device
    if "bf16" not in pipes:
        base, weights = request.getfixturevalue("tiny_base"), request.getfixturevalue("pisa_pkl")
        pipes["bf16"] = load_pipeline(weights=str(weights), base_model=str(base), dtype="bf16")
    pipe = pipes["bf16"]

    def poison(module, args, output):
        return output * float("nan") if output.dtype != torch.float32 else output

    handle = pipe.models.vae.decoder.conv_out.register_forward_hook(poison)
    try:
        result = pipe.upscale_with_info(noise_image(24, 20, 5), BASE)
    finally:
        handle.remove()
    assert any("fp32" in note for note in result.notes), result.notes
    assert _levels(result.image).std() > 1
    assert next(pipe.models.vae.parameters()).dtype == torch.bfloat16
    assert is_on_device(next(pipe.models.vae.parameters()))
