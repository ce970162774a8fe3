"""The x2 second pass: a second LoRA on the same backbone (TUDSR-style), or PiSA again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pisa_cli import load_pipeline
from pisa_cli.cli import app
from pisa_cli.errors import OptionsError, WeightsError
from pisa_cli.models.base import load_part
from pisa_cli.models.checkpoint import LoraLayer, load_checkpoint
from pisa_cli.models.lora import PisaUNet, UnetAdapter, checkpoint_adapters
from pisa_cli.models.second_lora import load_second_lora
from pisa_cli.options import SecondPassOptions, UpscaleOptions
from tests.builders import noise_image, second_lora_unet, write_second_lora


def tudsr(path, **kw) -> UpscaleOptions:
    second = SecondPassOptions(kind="tudsr", weights=str(path), **kw)
    return UpscaleOptions(process_size=64, second_pass=second)


@pytest.fixture(scope="module")
def two_pass(tiny_base, pisa_pkl, second_lora):
    return load_pipeline(
        weights=str(pisa_pkl),
        base_model=str(tiny_base),
        device="cpu",
        dtype="fp32",
        options=tudsr(second_lora),
    )


def test_both_file_layouts_give_the_same_lora(tiny_base, tmp_path, second_lora):
    peft = load_second_lora(second_lora)
    single = load_second_lora(write_second_lora(tiny_base, tmp_path / "d", layout="diffusers"))
    assert peft.timestep == single.timestep == 250
    assert [layer.module for layer in peft.layers] == [layer.module for layer in single.layers]
    for a, b in zip(peft.layers, single.layers, strict=True):
        assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up)
        assert a.scaling == b.scaling == 2.0  # lora_alpha 16 / rank 8, read from the files
    # a diffusers file without alphas: alpha = rank, as diffusers itself assumes
    bare = write_second_lora(tiny_base, tmp_path / "bare", layout="diffusers", alpha_in_file=False)
    assert {layer.scaling for layer in load_second_lora(bare).layers} == {1.0}


@pytest.mark.parametrize("scale", [4, 2])
def test_output_is_twice_the_first_pass(two_pass, second_lora, scale):
    image = noise_image(24, 20, 1)
    options = tudsr(second_lora)
    options = UpscaleOptions(scale=scale, process_size=64, second_pass=options.second_pass)
    result = two_pass.upscale_with_info(image, options)
    assert result.image.size == (24 * scale * 2, 20 * scale * 2)
    assert result.second_plan is not None
    assert result.second_plan.variants == ("second",)
    assert {"second_unet", "second_decode"} <= set(result.timings)


def test_second_pass_follows_the_timestep_formula(two_pass, tiny_base, second_lora):
    """eps from the backbone with the second LoRA (peft, unmerged) at timestep T, then
    z_H = (z_L - sqrt(1 - abar_T) eps) / sqrt(abar_T)."""
    reference, _ = second_lora_unet(tiny_base)
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(3))
    cond = two_pass.models.embed("")
    stage = two_pass.stages(tudsr(second_lora))[1]
    assert stage.timestep == 250
    tiles = two_pass.plan((80, 96), stage.options, stage.variants).unet
    with torch.inference_mode():
        eps = two_pass.models.predict(z, cond, stage.variants, tiles, 1, stage.timestep)
        ours = two_pass.models.step(z, eps, stage)
        expected_eps = reference(z, torch.tensor([250]), encoder_hidden_states=cond).sample
    abar = float(two_pass.models.scheduler.alphas_cumprod[250])
    expected = (z - (1 - abar) ** 0.5 * expected_eps) / abar**0.5
    assert torch.allclose(eps["second"], expected_eps, atol=1e-4)
    assert torch.allclose(ours, expected, atol=1e-3)


def test_the_flag_overrides_the_file_timestep(two_pass, second_lora):
    assert two_pass.stages(tudsr(second_lora, timestep=10))[1].timestep == 10


def test_a_lora_without_timestep_needs_the_flag(tiny_base, pisa_pkl, tmp_path):
    path = write_second_lora(tiny_base, tmp_path / "no-t", timestep=None)
    pipe = load_pipeline(
        weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu", options=tudsr(path)
    )
    with pytest.raises(OptionsError, match="does not say its timestep"):
        pipe.upscale(noise_image(16, 16), tudsr(path))
    assert pipe.upscale(noise_image(16, 16), tudsr(path, timestep=500)).size == (128, 128)


def test_switching_to_the_second_lora_and_back_is_exact(two_pass, second_lora):
    unet = two_pass.models.unet
    before = {k: v.clone() for k, v in unet.unet.state_dict().items()}
    z = torch.randn(1, 4, 8, 8)
    cond = two_pass.models.embed("")
    with torch.inference_mode():
        pisa_first = unet(z, cond, ("pisa",))
        unet(z, cond, ("second",), timestep=250)
        unet(z, cond, ("pix", "pisa"))
        pisa_again = unet(z, cond, ("pisa",))
    two_pass.upscale(noise_image(16, 16), tudsr(second_lora))
    after = unet.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(pisa_first, pisa_again)
    assert unet.merged == "second"  # the pass on 4x the pixels runs on merged weights


def test_pisa_variant_is_unchanged_by_the_second_lora(two_pass, pipeline):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    cond = two_pass.models.embed("")
    with torch.inference_mode():
        ours = two_pass.models.unet(z, cond, ("pix", "pisa"))
        plain = pipeline.models.unet(z, cond, ("pix", "pisa"))
    assert torch.allclose(ours, plain, atol=1e-4)


def test_lora_for_a_missing_module_is_refused(tiny_base, pisa_pkl, second_lora):
    lora = load_second_lora(second_lora)
    first = lora.layers[0]
    wrong = [LoraLayer("down_blocks.7.nowhere", first.down, first.up, first.scaling)]
    with pytest.raises(WeightsError, match=r"'down_blocks\.7\.nowhere' does not exist in the UNet"):
        adapters = checkpoint_adapters(load_checkpoint(pisa_pkl))
        adapters["second"] = UnetAdapter(tuple(wrong), "x")
        PisaUNet(load_part(tiny_base, "unet"), adapters, "second")


def test_lora_of_the_wrong_shape_is_refused(tiny_base, pisa_pkl, second_lora):
    lora = load_second_lora(second_lora)
    first = lora.layers[0]
    wrong = [LoraLayer(first.module, first.down[:, :3], first.up, first.scaling)]
    with pytest.raises(WeightsError, match="has shapes"):
        adapters = checkpoint_adapters(load_checkpoint(pisa_pkl))
        adapters["second"] = UnetAdapter(tuple(wrong), "x")
        PisaUNet(load_part(tiny_base, "unet"), adapters, "second")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.mkdir(), "needs adapter_config.json"),
        (lambda p: p.with_suffix(".bin").write_bytes(b"x"), "must be .safetensors"),
        (lambda p: None, "not found"),
    ],
)
def test_bad_lora_paths(tmp_path, setup, message):
    path = tmp_path / "lora"
    setup(path)
    target = path.with_suffix(".bin") if message == "must be .safetensors" else path
    with pytest.raises(WeightsError, match=message):
        load_second_lora(target)


def test_pisa_fallback_runs_pisa_again(pipeline):
    options = UpscaleOptions(process_size=64, second_pass=SecondPassOptions(kind="pisa"))
    result = pipeline.upscale_with_info(noise_image(20, 16, 5), options)
    assert result.image.size == (160, 128)
    assert result.second_plan.variants == ("pisa",)


def test_cli_second_pass(tiny_base, pisa_pkl, second_lora, tmp_path):
    noise_image(20, 16, 6).save(tmp_path / "in.png")
    args = ["--base-model", tiny_base, "--weights", pisa_pkl, "--device", "cpu"]
    args += ["--process-size", "64", "--second-pass", "tudsr", "--second-pass-weights", second_lora]
    result = CliRunner().invoke(
        app, ["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o"), *map(str, args)]
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "o" / "in.png").size == (160, 128)
    assert np.asarray(Image.open(tmp_path / "o" / "in.png")).std() > 0


def test_cli_tudsr_without_weights_is_a_usage_error(tmp_path):
    noise_image(20, 16, 7).save(tmp_path / "in.png")
    result = CliRunner().invoke(
        app,
        ["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o"), "--second-pass", "tudsr"],
    )
    assert result.exit_code == 2
    assert "--second-pass tudsr needs --second-pass-weights" in result.output


@pytest.mark.parametrize("kind", ["tudsr", "pisa"])
def test_sweep_points_go_through_the_second_pass_as_upscale_does(two_pass, second_lora, kind):
    """The lambdas apply to the first pass; each point's image is `pisa upscale`'s."""
    from pisa_cli.sweep.core import Sweeper
    from pisa_cli.sweep.grid import GridPoint

    second = tudsr(second_lora).second_pass if kind == "tudsr" else SecondPassOptions("pisa")
    options = UpscaleOptions(process_size=64, second_pass=second)
    image = noise_image(20, 16, 8)
    sweeper = Sweeper(two_pass, options)
    prepared = sweeper.prepare(image)
    assert prepared.output_size == (160, 128)
    points = [GridPoint(0.5, 0.7), GridPoint(1.3, 0.2)]
    for point, ours in sweeper.images(prepared, points):
        lambdas = {"lambda_pix": point.pix, "lambda_sem": point.sem}
        theirs = two_pass.upscale(image, UpscaleOptions(**{**options.__dict__, **lambdas}))
        assert ours.size == (160, 128)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), point
    assert {"second_unet", "second_decode"} <= set(prepared.timings)


def test_cli_sweep_with_second_pass(tiny_base, pisa_pkl, second_lora, tmp_path):
    noise_image(20, 16, 9).save(tmp_path / "in.png")
    args = ["--base-model", tiny_base, "--weights", pisa_pkl, "--device", "cpu"]
    args += ["--process-size", "64", "--second-pass", "tudsr", "--second-pass-weights", second_lora]
    args += ["--lambda-grid", "pix=1 sem=0,1"]
    result = CliRunner().invoke(
        app, ["sweep", str(tmp_path / "in.png"), "-o", str(tmp_path / "o"), *map(str, args)]
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "o" / "in"
    assert Image.open(folder / "pix1.00_sem0.00.png").size == (160, 128)
    record = json.loads((folder / "sweep.json").read_text())
    assert record["output_size"] == [160, 128]
    assert record["settings"]["second_pass"]["kind"] == "tudsr"
