"""The command line, in process (Typer's CliRunner) on temporary folders."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.builders import noise_image
from tests.fakes import run_fake
from tests.helpers import model_args, run, visible

FIXED_OPTIONS = [
    "--output",
    "--base-model",
    "--weights",
    "--scale",
    "--process-size",
    "--lambda-pix",
    "--lambda-sem",
    "--color-fix",
    "--latent-tile",
    "--latent-overlap",
    "--vae-encoder-tile",
    "--vae-decoder-tile",
    "--device",
    "--dtype",
    "--prompt",
    "--seed",
    "--vae-sample",
    "--tile-batch",
]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(20, 16, 1).save(folder / "one.png")
    noise_image(18, 18, 2).save(folder / "two.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_help_explains_every_option():
    result = run("upscale", "--help")
    assert result.exit_code == 0
    for option in FIXED_OPTIONS:
        assert option in result.output, option


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom pisa_cli.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("NO-TORCH")


def test_python_dash_m_works():
    out = subprocess.run(
        [sys.executable, "-m", "pisa_cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "upscale" in out.stdout


def test_upscale_a_folder(tiny_base, pisa_pkl, photos, tmp_path):
    out = tmp_path / "out"
    result = run(
        "upscale", photos, "-o", out, "--process-size", "64", *model_args(tiny_base, pisa_pkl)
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out / "one.png").size == (80, 64)
    assert Image.open(out / "two.png").size == (72, 72)
    assert visible(out) == ["one.png", "two.png"]
    assert (out / ".pisa-manifest.jsonl").is_file()
    assert "2 done, 0 skipped, 0 failed" in result.output
    assert "1 non-image files ignored" in result.output


def test_a_broken_image_fails_alone(tiny_base, pisa_pkl, photos, tmp_path):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (photos / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    result = run_fake(
        "upscale", photos, "-o", out, "--process-size", "64", *model_args(tiny_base, pisa_pkl)
    )
    assert result.exit_code == 1
    assert "2 done, 0 skipped, 2 failed" in result.output
    failed = [line for line in result.output.splitlines() if "broken.png" in line]
    assert len(failed) == 1 and ("corrupt" in failed[0] or "not an image" in failed[0])
    assert any("empty.jpg" in line and "empty file" in line for line in result.output.splitlines())
    assert visible(out) == ["one.png", "two.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--color-fix", "sepia"], "--color-fix 'sepia' is not one of"),
        (
            ["--latent-tile", "96", "--latent-overlap", "96"],
            "--latent-overlap 96 must be at least 0 and smaller",
        ),
        (["--latent-tile", "4"], "--latent-tile 4 is too small: use auto or at least 8"),
        (["--latent-tile", "big"], "--latent-tile 'big' must be auto or a whole number"),
        (["--vae-decoder-tile", "0"], "--vae-decoder-tile 0 is too small"),
        (["--vae-encoder-tile", "-5"], "--vae-encoder-tile -5 is too small"),
        (["--tile-batch", "0"], "--tile-batch 0 must be auto or at least 1"),
        (["--image-batch", "0"], "--image-batch 0 must be auto or from 1 to 64"),
        (["--image-batch", "65"], "--image-batch 65 must be auto or from 1 to 64"),
        (["--image-batch", "many"], "--image-batch 'many' must be auto or a whole number"),
        (["--latent-overlap", "-1"], "--latent-overlap -1 must be at least 0"),
        (["--scale", "0"], "--scale 0 must be"),
        (["--dtype", "fp8"], "--dtype 'fp8'"),
    ],
)
def test_bad_options_exit_2_with_one_line(photos, tmp_path, args, message):
    result = run("upscale", photos, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_weights_exit_3(tiny_base, photos, tmp_path):
    missing = tmp_path / "nowhere" / "pisa_sr.pkl"
    result = run(
        "upscale", photos, "-o", tmp_path / "out", "--base-model", tiny_base, "--weights", missing
    )
    assert result.exit_code == 3
    assert str(missing) in result.output and "not found" in result.output
    assert not list((tmp_path / "out").glob("*"))


def test_base_model_of_the_wrong_shape_exit_3(pisa_pkl, photos, tmp_path):
    result = run(
        "upscale", photos, "-o", tmp_path / "out", "--base-model", photos, "--weights", pisa_pkl
    )
    assert result.exit_code == 3
    assert "not a usable base model" in result.output


def test_weights_from_the_environment(tiny_base, pisa_pkl, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("PISA_WEIGHTS", str(pisa_pkl))
    monkeypatch.setenv("PISA_BASE_MODEL", str(tiny_base))
    result = run(
        "upscale",
        photos / "one.png",
        "-o",
        tmp_path / "out",
        "--process-size",
        "64",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "one.png").exists()


def test_convert_then_upscale_gives_the_same_bytes(tiny_base, pisa_pkl, photos, tmp_path):
    converted = tmp_path / "pisa_sr.safetensors"
    result = run("convert", pisa_pkl, "-o", converted)
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    outputs = []
    for weights in (pisa_pkl, converted):
        out = tmp_path / weights.suffix.strip(".")
        args = [
            "--base-model",
            tiny_base,
            "--weights",
            weights,
            "--device",
            "cpu",
            "--process-size",
            "64",
        ]
        assert (
            run("upscale", photos / "one.png", "-o", out, "--lambda-sem", "0.5", *args).exit_code
            == 0
        )
        outputs.append(np.asarray(Image.open(out / "one.png")))
    assert np.array_equal(*outputs)


def test_convert_refuses_a_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"")
    result = run("convert", bad, "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 3 and "empty" in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_doctor_works_without_weights():
    result = run("doctor", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "self-test" in result.output and "the install works" in result.output
    assert "missing" in result.output  # weights and base model are not here, and it says so


def test_doctor_reports_found_weights(tiny_base, pisa_pkl):
    result = run("doctor", "--device", "cpu", "--base-model", tiny_base, "--weights", pisa_pkl)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.strip().startswith("ok") and "weights" in line for line in lines)
    assert any(line.strip().startswith("ok") and "base model" in line for line in lines)


def test_dry_run_prints_the_plan_without_loading_anything(photos, tmp_path):
    # no weights and no base model anywhere: a dry run needs neither
    result = run("upscale", photos, "-o", tmp_path / "out", "--dry-run", "--lambda-sem", "0.5")
    assert result.exit_code == 0, result.output
    assert result.output.count("estimated working memory") == 2
    assert "20x16 -> 80x64" in result.output and "passes pix+pisa" in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_dry_run_names_an_unreadable_image(photos, tmp_path):
    (photos / "broken.png").write_bytes(b"not a png")
    result = run("upscale", photos, "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 1  # as the run would: an image fails
    assert "broken.png: not an image Pillow can read" in result.output


def test_command_defaults_are_the_options_defaults(tmp_path):
    """A command given no options builds the options' own defaults: each CLI default is
    read from its options field (``cli.spec.declared``), so the two cannot disagree."""
    import inspect

    from pisa_cli.cli import spec
    from pisa_cli.cli.sweep import OWN, sweep_command
    from pisa_cli.cli.upscale import upscale_command
    from pisa_cli.options import BatchOptions, ModelOptions, UpscaleOptions

    def defaults(command):
        parameters = inspect.signature(command).parameters.values()
        values = {p.name: p.default for p in parameters if p.default is not p.empty}
        return {**values, "inputs": [tmp_path], "output": tmp_path / "out"}

    upscale = spec.UpscaleSpec.parse(defaults(upscale_command))
    assert upscale.model == ModelOptions()
    assert upscale.options == UpscaleOptions()
    assert upscale.batch == BatchOptions()
    sweep = spec.SweepSpec.parse(defaults(sweep_command), tuple(p.name for p in OWN))
    assert sweep.model == ModelOptions() and sweep.options == UpscaleOptions()
    assert (sweep.max_pixels, sweep.image_batch) == (BatchOptions().max_pixels, None)


def test_log_lines_follow_stderr_after_the_run_s_stream_is_closed(monkeypatch, capsys):
    """Logging set up while stderr was a stream that is closed since (CliRunner's) writes
    to the stderr of now, not "--- Logging error ---" on the closed one."""
    import io
    import logging

    from pisa_cli.cli.common import setup_logging

    during = io.StringIO()
    monkeypatch.setattr(sys, "stderr", during)
    setup_logging()
    logging.getLogger("pisa_cli.test").warning("first")
    during.close()
    after = io.StringIO()
    monkeypatch.setattr(sys, "stderr", after)
    logging.getLogger("pisa_cli.test").warning("second")
    assert after.getvalue() == "WARNING second\n"
