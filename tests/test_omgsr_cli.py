"""The OMGSR-style family on the command line: runs, resume, dry run, report, manifest,
doctor, and each refusal (one line naming the file, exit 3)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from pisa_cli import load_pipeline
from pisa_cli.cli import app
from pisa_cli.imaging.manifest import MANIFEST_NAME
from pisa_cli.options import SecondPassOptions, UpscaleOptions
from tests.builders import noise_image

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def model_args(base, weights):
    args = ["--base-model", base, "--weights", weights, "--device", "cpu", "--dtype", "fp32"]
    return [*args, "--process-size", "64"]


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    noise_image(24, 20, 7).save(path)
    return path


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_upscale_with_an_adapter_folder(tiny_base, adapter_folder, photo, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.json"
    args = model_args(tiny_base, adapter_folder)
    result = run("upscale", photo.parent, "-o", out, *args, "--report", report)
    assert result.exit_code == 0, result.output
    written = Image.open(out / "photo.png")
    assert written.size == (96, 80)
    pipe = load_pipeline(
        weights=str(adapter_folder), base_model=str(tiny_base), device="cpu", dtype="fp32"
    )
    expected = pipe.upscale(noise_image(24, 20, 7), UpscaleOptions(process_size=64))
    assert np.array_equal(np.asarray(written), np.asarray(expected))
    data = json.loads(report.read_text())
    model = data["settings"]["model"]
    assert (model["family"], model["timestep"]) == ("omgsr", 273)
    assert data["images"][0]["family"] == "omgsr"
    record = json.loads((out / MANIFEST_NAME).read_text().splitlines()[-1])
    assert record["settings"]["model"]["family"] == "omgsr"
    assert record["settings"]["model"]["timestep"] == 273
    # resume: up to date; another timestep redoes it
    again = run("upscale", photo.parent, "-o", out, *args)
    assert again.exit_code == 0 and "1 outputs up to date" in again.output
    other = run("upscale", photo.parent, "-o", out, *args, "--timestep", "300")
    assert other.exit_code == 0 and "1 outputs will be redone: settings changed" in other.output
    assert not np.array_equal(np.asarray(Image.open(out / "photo.png")), np.asarray(written))


def test_dry_run_names_the_family_and_the_official_tiles(
    tiny_base, adapter_folder, photo, tmp_path
):
    result = run(
        "upscale", photo, "-o", tmp_path / "o", *model_args(tiny_base, adapter_folder), "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert "model: OMGSR-style" in result.output and "timestep 273 (default 273)" in result.output
    assert (
        "tile(s) of 8x8 latent px, overlap 4" in result.output and "passes first" in result.output
    )
    override = ["--latent-tile", "10", "--latent-overlap", "3", "--dry-run"]
    result = run(
        "upscale", photo, "-o", tmp_path / "o", *model_args(tiny_base, adapter_folder), *override
    )
    assert "tile(s) of 10x10 latent px, overlap 3" in result.output


def test_dry_run_of_the_pisa_family_is_unchanged(tiny_base, pisa_pkl, photo, tmp_path):
    result = run(
        "upscale", photo, "-o", tmp_path / "o", *model_args(tiny_base, pisa_pkl), "--dry-run"
    )
    assert "model: PiSA-SR" in result.output and "overlap 32," in result.output
    assert "passes pisa" in result.output


def test_second_pass_with_a_folder_on_the_command_line(
    tiny_base, pisa_pkl, adapter_folder_2, photo, tmp_path
):
    args = [
        *model_args(tiny_base, pisa_pkl),
        "--second-pass",
        "tudsr",
        "--second-pass-weights",
        adapter_folder_2,
    ]
    report = tmp_path / "r.json"
    result = run("upscale", photo, "-o", tmp_path / "o", *args, "--report", report)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "o" / "photo.png").size == (192, 160)
    model = json.loads(report.read_text())["settings"]["model"]
    assert model["family"] == "pisa-sr" and model["second_pass_family"] == "omgsr"
    assert model["second_pass_timestep"] == 273


def test_doctor_names_the_family(tiny_base, adapter_folder):
    result = run(
        "doctor", "--device", "cpu", "--base-model", tiny_base, "--weights", adapter_folder
    )
    assert result.exit_code == 0, result.output
    line = next(
        line for line in result.output.splitlines() if "weights" in line and "OMGSR" in line
    )
    assert "VAE-encoder LoRA 22 layers rank 4" in line and "timestep 273" in line


def test_sweep_refuses_the_family(tiny_base, adapter_folder, photo, tmp_path):
    result = run("sweep", photo, "-o", tmp_path / "s", *model_args(tiny_base, adapter_folder))
    assert result.exit_code == 3
    (line,) = error_lines(result)
    assert str(adapter_folder) in line and "no lambdas to sweep" in line


def test_second_pass_pisa_needs_pisa_weights(tiny_base, adapter_folder, photo, tmp_path):
    result = run(
        "upscale",
        photo,
        "-o",
        tmp_path / "o",
        *model_args(tiny_base, adapter_folder),
        "--second-pass",
        "pisa",
    )
    assert result.exit_code == 2
    assert "--second-pass pisa needs PiSA-SR weights" in error_lines(result)[0]


# --- refusals ----------------------------------------------------------------------------
def _rename_module(path, old, new):
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k.replace(f".{old}.", f".{new}."): handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path))


def _widen(path, module):
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    key = f"base_model.model.{module}.lora_A.weight"
    down = tensors[key]
    tensors[key] = torch.cat([down, down[:, :1]], dim=1)
    save_file(tensors, str(path))


def _set_config(path, **values):
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **values}))


UNET, VAE = "unet_lora_adapter", "vae_encoder_lora_adapter"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
BROKEN = {
    "no unet adapter": (lambda f: shutil.rmtree(f / UNET), UNET, "missing"),
    "no encoder adapter": (lambda f: shutil.rmtree(f / VAE), VAE, "missing"),
    "no adapter weights": (
        lambda f: (f / UNET / WEIGHTS).unlink(),
        UNET,
        "needs adapter_config.json",
    ),
    "unet module": (
        lambda f: _rename_module(f / UNET / WEIGHTS, "conv_in", "conv_nowhere"),
        UNET,
        "'conv_nowhere' does not exist in the UNet",
    ),
    "encoder module": (
        lambda f: _rename_module(f / VAE / WEIGHTS, "conv_in", "conv_nowhere"),
        VAE,
        "'conv_nowhere' does not exist in the VAE encoder",
    ),
    "rank": (lambda f: _set_config(f / UNET / CONFIG, r=5), UNET, "do not fit rank 5"),
    "shape": (
        lambda f: _widen(f / VAE / WEIGHTS, "conv_out"),
        VAE,
        "'conv_out' has shapes",
    ),
    "config": (lambda f: (f / VAE / CONFIG).write_text("[1, 2]"), VAE, "not a JSON object"),
    "dora": (lambda f: _set_config(f / UNET / CONFIG, use_dora=True), UNET, "use_dora"),
    "recorded timestep": (
        lambda f: (f / "cfg.yml").write_text("mid_timestep: 5000\n"),
        "cfg.yml",
        "mid_timestep 5000 is not a whole number from 1 to 999",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folders_are_refused(tiny_base, adapter_folder, photo, tmp_path, case):
    breaks, where, message = BROKEN[case]
    folder = tmp_path / "broken"
    shutil.copytree(adapter_folder, folder)
    breaks(folder)
    result = run("upscale", photo, "-o", tmp_path / "o", *model_args(tiny_base, folder))
    assert result.exit_code == 3, result.output
    (line,) = error_lines(result)
    assert str(folder / where) in line and message in line, line
    assert not (tmp_path / "o").exists()  # refused at planning, or a failed load removed it


@pytest.mark.parametrize("value", ["1000", "-1"])
def test_a_timestep_outside_the_scheduler_is_refused(
    tiny_base, adapter_folder, photo, tmp_path, value
):
    args = [*model_args(tiny_base, adapter_folder), "--timestep", value]
    result = run("upscale", photo, "-o", tmp_path / "o", *args)
    assert result.exit_code == 3, result.output
    (line,) = error_lines(result)
    assert str(adapter_folder) in line and f"timestep {value} (--timestep) is outside" in line


def test_a_second_pass_timestep_outside_the_scheduler_is_refused(
    tiny_base, pisa_pkl, adapter_folder_2, photo, tmp_path
):
    args = [
        *model_args(tiny_base, pisa_pkl),
        "--second-pass",
        "tudsr",
        "--second-pass-weights",
        adapter_folder_2,
    ]
    result = run("upscale", photo, "-o", tmp_path / "o", *args, "--second-pass-timestep", "1000")
    assert result.exit_code == 3, result.output
    assert str(adapter_folder_2) in error_lines(result)[0]


def test_broken_second_pass_folder_is_refused(
    tiny_base, pisa_pkl, adapter_folder_2, photo, tmp_path
):
    folder = tmp_path / "broken"
    shutil.copytree(adapter_folder_2, folder)
    shutil.rmtree(folder / VAE)
    args = [
        *model_args(tiny_base, pisa_pkl),
        "--second-pass",
        "tudsr",
        "--second-pass-weights",
        folder,
    ]
    result = run("upscale", photo, "-o", tmp_path / "o", *args)
    assert result.exit_code == 3, result.output
    (line,) = error_lines(result)
    assert str(folder / VAE) in line and "missing" in line


def test_a_pisa_timestep_is_a_usage_error(pipeline):
    with pytest.raises(Exception, match="PiSA-SR runs at t = 1"):
        pipeline.stages(UpscaleOptions(timestep=200))


def test_second_pass_options_of_the_api(tiny_base, pisa_pkl, adapter_folder_2):
    options = UpscaleOptions(
        process_size=64,
        second_pass=SecondPassOptions(kind="tudsr", weights=str(adapter_folder_2), timestep=100),
    )
    pipe = load_pipeline(
        weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu", options=options
    )
    assert pipe.stages(options)[1].timestep == 100


def test_convert_names_an_adapter_folder(adapter_folder, tmp_path):
    result = run("convert", adapter_folder, "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 3
    assert "a UNet + VAE-encoder adapter folder, not PiSA-SR weights" in error_lines(result)[0]


def test_a_folder_of_neither_kind_is_refused(tiny_base, photo, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("upscale", photo, "-o", tmp_path / "o", *model_args(tiny_base, tmp_path / "empty"))
    assert result.exit_code == 3
    assert "not a UNet + VAE-encoder adapter folder" in error_lines(result)[0]


def test_sweep_takes_a_folder_as_second_pass(
    tiny_base, pisa_pkl, adapter_folder_2, photo, tmp_path
):
    args = [*model_args(tiny_base, pisa_pkl), "--second-pass", "tudsr"]
    args += ["--second-pass-weights", adapter_folder_2, "--lambda-grid", "pix=1 sem=0,1"]
    result = run("sweep", photo, "-o", tmp_path / "s", *args)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "s" / "photo" / "pix1.00_sem1.00.png").size == (192, 160)


def test_lambdas_are_refused_with_one_line(tiny_base, adapter_folder, photo, tmp_path):
    """Only PiSA-SR has lambdas: an OMGSR-style folder refuses them (exit 2, before any
    model loads) instead of leaving them unused."""
    out = tmp_path / "out"
    args = [*model_args(tiny_base, adapter_folder), "--lambda-pix", "0.5"]
    result = run("upscale", photo.parent, "-o", out, *args)
    assert result.exit_code == 2, result.output
    assert "only PiSA-SR has lambdas; an OMGSR-style adapter folder has none" in result.output
    assert not out.exists()
