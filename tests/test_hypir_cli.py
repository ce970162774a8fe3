"""HYPIR-SD2 through the pipeline and `pisa upscale`: the family found from the file's keys,
the official path within the bar, 16-bit inputs, its options and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pisa_cli import load_pipeline
from pisa_cli.cli import app
from pisa_cli.errors import OptionsError, WeightsError
from pisa_cli.imaging.deep import DeepImage
from pisa_cli.options import SecondPassOptions, TileOptions, UpscaleOptions
from tests.helpers import assert_close, noise_image
from tests.hypir_reference import hypir_enhance

runner = CliRunner()


@pytest.fixture(scope="module")
def pipe(tiny_base, hypir_pth):
    kw = {"device": "cpu", "dtype": "fp32"}
    return load_pipeline(weights=str(hypir_pth), base_model=str(tiny_base), **kw)


def options(**kw) -> UpscaleOptions:
    """HYPIR's defaults at a 64 patch (half-window overlap: stride 32), wavelet."""
    return UpscaleOptions(**{"process_size": 64, "color_fix": "wavelet", **kw})


def test_the_pipeline_runs_the_official_path(pipe, hypir_oracle):
    assert pipe.passes.family == "hypir"
    stage = pipe.stages(options())[0]
    assert (stage.rule, stage.timestep, stage.tiling) == ("own", 200, "windows")
    assert "non-commercial" in pipe.describe(options())[0]
    image = noise_image(20, 24, seed=5)
    result = pipe.upscale_with_info(image, options())
    assert_close(result.image, hypir_enhance(hypir_oracle, image, patch_size=64, stride=32))
    assert (
        len(result.plan.unet.tiles) == len(result.plan.unet.tiles) and result.plan.latent_tile == 8
    )
    tiles = TileOptions(latent_overlap=2, tile_batch=3)  # stride 64 - 16 = 48
    small = pipe.upscale(noise_image(17, 14, seed=6), options(tiles=tiles, scale=2))
    theirs = hypir_enhance(
        hypir_oracle, noise_image(17, 14, seed=6), upscale=2, patch_size=64, stride=48
    )
    assert_close(small, theirs)


def test_a_16_bit_input_stays_16_bit(pipe):
    rgb = noise_image(16, 16, seed=2)
    deep = DeepImage.from_array(np.asarray(rgb, dtype=np.float32) / 255)
    out = pipe.upscale(deep, options())
    assert isinstance(out, DeepImage) and out.size == (64, 64)
    eight = np.asarray(pipe.upscale(rgb, options()), dtype=np.float32) / 255
    assert np.abs(out.to_array() - eight).max() <= 1.5 / 255  # one quantization, finer grid


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"lambda_pix": 0.5}, "only PiSA-SR has lambdas"),
        ({"second_pass": SecondPassOptions(kind="pisa")}, "single pass"),
        ({"timestep": 1000}, "from 0 to 999"),
        ({"tiles": TileOptions(latent_tile=12)}, "set --process-size"),
    ],
)
def test_options_it_cannot_take_are_refused(pipe, kw, message):
    with pytest.raises(OptionsError, match=message):
        pipe.upscale(noise_image(16, 16), options(**kw))


def test_as_a_second_pass_it_is_refused(tiny_base, pisa_pkl, hypir_pth):
    second = SecondPassOptions(kind="tudsr", weights=str(hypir_pth))
    with pytest.raises(WeightsError, match="first pass only"):
        load_pipeline(
            weights=str(pisa_pkl),
            base_model=str(tiny_base),
            device="cpu",
            dtype="fp32",
            options=UpscaleOptions(second_pass=second),
        )


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_pisa_upscale_with_hypir_weights(tiny_base, hypir_pth, hypir_oracle, tmp_path):
    source = tmp_path / "in" / "photo.png"
    source.parent.mkdir()
    noise_image(24, 20, 7).save(source)
    out, report = tmp_path / "out", tmp_path / "report.json"
    args = ["--base-model", tiny_base, "--weights", hypir_pth, "--device", "cpu"]
    args += ["--dtype", "fp32", "--process-size", "64"]
    result = run("upscale", source.parent, "-o", out, *args, "--report", report)
    assert result.exit_code == 0, result.output
    written = Image.open(out / "photo.png")
    theirs = hypir_enhance(hypir_oracle, noise_image(24, 20, 7), patch_size=64, stride=32)
    assert_close(written, theirs)  # the default colour fix is HYPIR's wavelet
    data = json.loads(report.read_text())
    assert data["settings"]["model"]["family"] == "hypir"
    assert data["settings"]["model"]["timestep"] == 200
    dry = run("upscale", source, "-o", tmp_path / "o2", *args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "HYPIR-SD2" in dry.output and "non-commercial" in dry.output
    again = run("upscale", source.parent, "-o", out, *args, "--timestep", "300")
    assert again.exit_code == 0 and "settings changed" in again.output


def test_any_scale_is_hypir_s_own(tiny_base, hypir_pth, pisa_pkl, tmp_path):
    """HYPIR resizes the input to the target size itself, then restores: --scale 2 gets no
    "trained for x4" warning, as it does for PiSA-SR's weights."""
    source = tmp_path / "photo.png"
    noise_image(24, 20, 7).save(source)
    for weights, warned in ((hypir_pth, False), (pisa_pkl, True)):
        args = ["--base-model", tiny_base, "--weights", weights, "--scale", "2", "--dry-run"]
        result = run("upscale", source, "-o", tmp_path / "out", *args)
        assert result.exit_code == 0, result.output
        assert ("warning: --scale 2: the model is trained for x4" in result.output) is warned


def test_doctor_and_sweep_know_the_family(tiny_base, hypir_pth, tmp_path):
    args = ["--base-model", tiny_base, "--weights", hypir_pth]
    doctor = run("doctor", "--device", "cpu", *args)
    assert doctor.exit_code == 0, doctor.output
    line = next(line for line in doctor.output.splitlines() if "HYPIR-SD2" in line)
    assert "rank 8" in line and "non-commercial" in line
    source = tmp_path / "photo.png"
    noise_image(16, 16).save(source)
    sweep = run("sweep", source, "-o", tmp_path / "s", *args, "--device", "cpu")
    assert sweep.exit_code == 3
    errors = [line for line in sweep.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "HYPIR-SD2 has no lambdas to sweep" in errors[0]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("stage", "limit"), [("decode", 8), ("encode", 64)])
def test_out_of_memory_bands_the_vae_windows_with_the_same_image(pipe, monkeypatch, stage, limit):
    import pisa_cli.core.recovery as recovery
    import pisa_cli.engine.vae as vae_module

    monkeypatch.setattr(recovery, "release_memory", lambda: None)  # a full gc costs 0.5 s
    image, settings = noise_image(20, 24, 1), options(process_size=128)  # 2 windows of 128
    expected = pipe.upscale(image, settings)
    original, seen = getattr(vae_module, stage), []

    def refusing(*args, tile=None, **kwargs):
        seen.append(tile)
        if tile is None or tile > limit:
            raise MemoryError
        return original(*args, tile=tile, **kwargs)

    monkeypatch.setattr(vae_module, stage, refusing)
    result = pipe.upscale_with_info(image, settings)
    assert seen[0] is None and seen[-1] == limit
    assert any("out of memory" in note for note in result.notes)
    assert_close(result.image, expected, mean=0.01)


def test_vae_tiles_band_each_window(pipe):
    image, plain = noise_image(20, 24, 1), options(process_size=128)
    tiles = TileOptions(vae_encoder_tile=64, vae_decoder_tile=8)
    result = pipe.upscale_with_info(image, options(process_size=128, tiles=tiles))
    assert (result.plan.encoder_tile, result.plan.decoder_tile) == (64, 8)
    assert_close(result.image, pipe.upscale(image, plain), mean=0.01)


def test_out_of_memory_in_the_unet_halves_the_windows_per_call_only(pipe, monkeypatch):
    import pisa_cli.core.recovery as recovery
    from pisa_cli.errors import OutOfMemoryError

    monkeypatch.setattr(recovery, "release_memory", lambda: None)  # a full gc costs 0.5 s
    batches, original = [], pipe.models.unet.__class__.__call__

    def refusing(self, latents, *args, **kwargs):
        batches.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return original(self, latents, *args, **kwargs)

    monkeypatch.setattr(pipe.models.unet.__class__, "__call__", refusing)
    image, settings = noise_image(20, 24, 1), options(tiles=TileOptions(tile_batch=4))
    result = pipe.upscale_with_info(image, settings)
    assert batches[:3] == [4, 2, 1] and result.plan.tile_batch == 1
    monkeypatch.setattr(
        pipe.models.unet.__class__,
        "__call__",
        lambda *a, **k: refusing(*a[:1], a[1].repeat(2, 1, 1, 1)),
    )
    with pytest.raises(OutOfMemoryError, match="out of memory in the UNet even at tile 8x8"):
        pipe.upscale(image, settings)


def test_a_non_finite_decode_in_bf16_is_redone_in_fp32(tiny_base, hypir_pth, monkeypatch):
    import torch

    import pisa_cli.engine.vae as vae_module

    kw = {"device": "cpu", "dtype": "bf16"}
    low = load_pipeline(weights=str(hypir_pth), base_model=str(tiny_base), **kw)
    original = vae_module.decode

    def overflowing(vae, latents, **kwargs):
        out = original(vae, latents, **kwargs)
        return out * float("inf") if next(vae.parameters()).dtype == torch.bfloat16 else out

    monkeypatch.setattr(vae_module, "decode", overflowing)
    result = low.upscale_with_info(noise_image(16, 16, 3), options())
    assert any("VAE decoder gave inf/NaN in bfloat16; redone in fp32" in n for n in result.notes)
    assert np.asarray(result.image).std() > 0 and low.models.vae.dtype == torch.bfloat16


def test_vae_sample_is_seeded(pipe):
    image = noise_image(16, 16, 4)

    def sampled(seed):
        return np.asarray(pipe.upscale(image, options(vae_sample=True, seed=seed)), dtype=int)

    first, mean = sampled(1), np.asarray(pipe.upscale(image, options()), dtype=int)
    assert np.array_equal(first, sampled(1))
    assert not np.array_equal(first, sampled(2)) and not np.array_equal(first, mean)


def test_a_damaged_file_is_one_line_and_no_output_folder(tiny_base, hypir_pth, tmp_path):
    import torch

    state = torch.load(hypir_pth, weights_only=True)
    state["optimizer_step"] = torch.zeros(1)
    damaged = tmp_path / "HYPIR_sd2.pth"
    torch.save(state, damaged)
    source = tmp_path / "photo.png"
    noise_image(16, 16).save(source)
    args = ["--base-model", tiny_base, "--weights", damaged, "--device", "cpu"]
    result = run("upscale", source, "-o", tmp_path / "out", *args)
    assert result.exit_code == 3, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(damaged) in errors[0] and "'optimizer_step'" in errors[0]
    assert not (tmp_path / "out").exists()
