"""Outputs the file system cannot name are refused before any model work, in one line
naming the input; a dry run exits as the run would."""

from __future__ import annotations

import os

import pytest

from tests.builders import noise_image
from tests.fakes import FakePipeline, run_on

STEM = "a" * 251  # + ".png": 255 bytes, the longest name most file systems allow


@pytest.fixture
def fake_model(tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"fake weights")
    return ["--weights", weights, "--base-model", "fake-base", "--device", "cpu"]


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.mark.skipif(os.pathconf("/tmp", "PC_NAME_MAX") != 255, reason="needs 255-byte names")
@pytest.mark.parametrize(
    ("names", "extra"),
    [([f"{STEM}.png"], ["--suffix", "_x4"]), ([f"{STEM}.png", f"{STEM}.JPG"], [])],
    ids=["suffix", "collision"],
)
def test_a_name_too_long_fails_before_the_model_naming_the_input(
    tmp_path, fake_model, names, extra
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in [*names, "ok.png"]:
        noise_image(8, 8).save(inputs / name, format="PNG")
    out = tmp_path / "out"
    fake = FakePipeline()
    result = run_on(fake, "upscale", inputs, "-o", out, *fake_model, *extra)
    assert result.exit_code == 1, result.output
    errors = _errors(result)
    assert len(errors) == len(names), result.output
    for name, line in zip(sorted(names), sorted(errors), strict=True):
        assert line.startswith(f"error: {inputs / name}: its output name would be "), line
        assert "more than the 255 the file system" in line
    assert fake.calls == 1 and sorted(p.name for p in out.iterdir() if p.name[0] != ".") == [
        "ok.png" if not extra else "ok_x4.png"
    ]
    assert f"1 done, 0 skipped, {len(names)} failed" in result.output
    dry = run_on(None, "upscale", inputs, "-o", tmp_path / "dry", *fake_model, *extra, "--dry-run")
    assert dry.exit_code == 1 and len(_errors(dry)) == len(names), dry.output
    assert not (tmp_path / "dry").exists()


def test_a_dry_run_exits_as_the_run_would(tmp_path, fake_model):
    photo = tmp_path / "photo.png"
    noise_image(16, 16).save(photo)
    args = ["upscale", photo, "-o", tmp_path / "out", *fake_model, "--max-pixels", "100"]
    run = run_on(None, *args)
    dry = run_on(None, *args, "--dry-run")
    assert run.exit_code == dry.exit_code == 1, (run.output, dry.output)
    assert "more than --max-pixels 100" in dry.output
    assert run_on(None, *args[:-2], "--dry-run").exit_code == 0
    sweep = ["sweep", photo, "-o", tmp_path / "s", *fake_model, "--lambda-grid", "pix=1 sem=0,1"]
    assert run_on(None, *sweep, "--max-pixels", "100", "--dry-run").exit_code == 1
    assert run_on(None, *sweep, "--dry-run").exit_code == 0
