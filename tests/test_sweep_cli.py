"""`pisa sweep` in process: the files it writes, their contents, and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pisa_cli.cli import app
from pisa_cli.models.device import resolve_dtype
from pisa_cli.sweep.metrics import psnr_y, ssim_y
from tests.builders import noise_image

runner = CliRunner()
GRID = "pix=0,1 sem=0,0.5,1"
"""Six points holding the three basis points."""
POINT_FILES = [f"pix{p}_sem{s}.png" for p in ("0.00", "1.00") for s in ("0.00", "0.50", "1.00")]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def model_args(tiny_base, pisa_pkl):
    return ["--base-model", tiny_base, "--weights", pisa_pkl, "--device", "cpu"]


def write_photos(folder):
    folder.mkdir()
    noise_image(20, 16, 1).save(folder / "one.png")
    noise_image(18, 18, 2).save(folder / "two.jpg", quality=95)
    return folder


def write_truths(folder):
    folder.mkdir()
    noise_image(80, 64, 11).save(folder / "one.png")
    noise_image(72, 72, 12).save(folder / "two.png")
    return folder


@pytest.fixture
def photos(tmp_path):
    return write_photos(tmp_path / "photos")


@pytest.fixture
def truths(tmp_path):
    return write_truths(tmp_path / "gt")


@pytest.fixture(scope="module")
def swept(tiny_base, pisa_pkl, tmp_path_factory):
    """One sweep of two photos with ground truth and viewer: (output folder, CLI result)."""
    folder = tmp_path_factory.mktemp("swept")
    photos, truths = write_photos(folder / "photos"), write_truths(folder / "gt")
    out = folder / "out"
    result = run(
        "sweep", photos, "-o", out, "--lambda-grid", GRID, "--gt", truths, "--viewer",
        "--process-size", "64", *model_args(tiny_base, pisa_pkl),
    )  # fmt: skip
    return out, result


def test_files_per_image(swept):
    out, result = swept
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]
    expected = [
        *POINT_FILES,
        "contact_sheet.png",
        "heatmap_psnr.png",
        "heatmap_ssim.png",
        "metrics.csv",
        "sweep.json",
        "viewer.html",
    ]
    assert sorted(p.name for p in (out / "one").iterdir()) == sorted(expected)
    assert Image.open(out / "one" / "pix0.00_sem0.50.png").size == (80, 64)
    assert Image.open(out / "two" / "pix1.00_sem1.00.png").size == (72, 72)
    assert "2 done, 0 skipped, 0 failed" in result.output


def test_sweep_json_records_settings_grid_and_cost(swept):
    out, _ = swept
    record = json.loads((out / "one" / "sweep.json").read_text())
    assert record["grid"]["pix"] == [0.0, 1.0] and record["grid"]["sem"] == [0.0, 0.5, 1.0]
    assert [(p["lambda_pix"], p["lambda_sem"]) for p in record["points"]] == [
        (0.0, 0.0), (1.0, 0.0), (0.0, 0.5), (1.0, 0.5), (0.0, 1.0), (1.0, 1.0),
    ]  # fmt: skip
    assert {p["file"] for p in record["points"]} == set(POINT_FILES)
    assert record["settings"]["color_fix"] == "adain" and record["settings"]["process_size"] == 64
    assert "lambda_pix" not in record["settings"]
    assert record["cost"]["decoded_points"] == 6
    # auto precision: bf16 where the CPU has it, and then (1, 1) needs the PiSA-merged model
    low = resolve_dtype("auto", torch.device("cpu")) != torch.float32
    assert record["cost"]["unet_passes"] == ["pix", "pisa", *(["pisa merged"] if low else [])]
    assert record["cost"]["unet_calls"] == (2 if low else 1)
    assert record["input_size"] == [20, 16] and record["output_size"] == [80, 64]
    assert set(record["best"]) == {"psnr", "ssim"}


def test_metrics_are_those_of_the_written_images(swept):
    out, result = swept
    truths = out.parent / "gt"
    with open(out / "one" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    assert list(rows[0]) == ["lambda_pix", "lambda_sem", "file", "psnr", "ssim"]
    truth = np.asarray(Image.open(truths / "one.png").convert("RGB"))
    for row in rows:
        image = np.asarray(Image.open(out / "one" / row["file"]))
        assert float(row["psnr"]) == pytest.approx(psnr_y(image, truth), rel=1e-5)
        assert float(row["ssim"]) == pytest.approx(ssim_y(image, truth), rel=1e-5, abs=1e-6)
    best = max(rows, key=lambda row: float(row["psnr"]))
    line = (
        f"best psnr {float(best['psnr']):.4g} at lambda_pix {best['lambda_pix']}, "
        f"lambda_sem {best['lambda_sem']}"
    )
    assert any(str(out / "one") in text and line in text for text in result.output.splitlines())


def test_no_images_keeps_the_rest(tiny_base, pisa_pkl, photos, tmp_path):
    out = tmp_path / "out"
    result = run(
        "sweep", photos / "one.png", "-o", out, "--lambda-grid", "pix=1 sem=0.5,1",
        "--no-images", "--viewer", "--process-size", "64", *model_args(tiny_base, pisa_pkl),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "one").iterdir()) == [
        "contact_sheet.png", "sweep.json", "viewer.html",
    ]  # fmt: skip
    html = (out / "one" / "viewer.html").read_text()
    # three basis images, the bicubic input and the two exact images, all embedded
    assert html.count("data:image/png;base64,") == 6
    record = json.loads((out / "one" / "sweep.json").read_text())
    assert all(point["file"] is None for point in record["points"])
    assert record["cost"]["decoded_points"] == 2 + 2  # (1, 1) is a grid point; (0, 0), (1, 0) not


def test_a_second_sweep_replaces_the_first(tiny_base, pisa_pkl, photos, tmp_path):
    out = tmp_path / "out"
    args = ["--process-size", "64", *model_args(tiny_base, pisa_pkl)]
    assert run("sweep", photos / "one.png", "-o", out, "--lambda-grid", GRID, *args).exit_code == 0
    (out / "one" / "notes.txt").write_text("mine")
    result = run("sweep", photos / "one.png", "-o", out, "--lambda-grid", "pix=1 sem=1", *args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "one").iterdir()) == [
        "contact_sheet.png", "notes.txt", "pix1.00_sem1.00.png", "sweep.json",
    ]  # fmt: skip
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lambda-grid", "pix=0,1"], "does not name the sem axis"),
        (["--lambda-grid", "pix=0;1 sem=1"], "pix axis: '0;1' is not a number"),
        (["--lambda-grid", "pix=1:0:0.1 sem=1"], "empty range"),
        (["--lambda-grid", "pix=0:1:0.1 sem=0:1:0.1"], "121 points (11 pix x 11 sem), more than"),
        (["--lambda-grid", "pix=0:1:0.5 sem=0:1:0.5", "--max-points", "8"], "more than --max"),
        (["--metrics", "psnr"], "give --gt DIR"),
        (["--gt", "no-such-folder"], "--gt no-such-folder: no such folder"),
        (["--sheet-cell", "8"], "--sheet-cell 8 must be"),
        (["--color-fix", "sepia"], "--color-fix 'sepia' is not one of"),
    ],
)
def test_bad_options_exit_2_with_one_line(photos, tmp_path, args, message):
    # no weights or base model anywhere: the options fail before any model would load
    result = run("sweep", photos, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_perceptual_metrics_without_pyiqa_say_how_to_get_them(
    photos, truths, tmp_path, monkeypatch
):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    result = run("sweep", photos, "-o", tmp_path / "out", "--gt", truths, "--metrics", "psnr,lpips")
    assert result.exit_code == 2
    assert "pyiqa" in result.output and "pisa-cli[metrics]" in result.output


def test_ground_truth_of_another_size_fails_that_image_only(
    tiny_base, pisa_pkl, photos, truths, tmp_path
):
    noise_image(70, 70, 13).save(truths / "two.png")
    (truths / "one.png").rename(truths / "one.jpg")  # matched by stem, any extension
    out = tmp_path / "out"
    result = run(
        "sweep", photos, "-o", out, "--lambda-grid", "pix=1 sem=0,1", "--gt", truths,
        "--process-size", "64", *model_args(tiny_base, pisa_pkl),
    )  # fmt: skip
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if "two.png" in line]
    assert (
        len(failed) == 1 and "ground truth is 70x70 but the output of two.jpg is 72x72" in failed[0]
    )
    assert "1 done, 0 skipped, 1 failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["one"]  # nothing at all for two


def test_missing_ground_truth_fails_that_image_only(tiny_base, pisa_pkl, photos, truths, tmp_path):
    (truths / "two.png").unlink()
    out = tmp_path / "out"
    result = run(
        "sweep", photos, "-o", out, "--lambda-grid", "pix=1 sem=1", "--gt", truths,
        "--process-size", "64", *model_args(tiny_base, pisa_pkl),
    )  # fmt: skip
    assert result.exit_code == 1
    assert "no ground truth named two.* in" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["one"]


def test_help_documents_the_grid_and_takes_upscale_options():
    result = run("sweep", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "pix=0,0.5,1 sem=0:1.5:0.25" in text and "start:stop:step" in text
    for option in ("--lambda-grid", "--max-points", "--no-images", "--gt", "--viewer", "--metrics"):
        assert option in result.output, option
    for option in ("--base-model", "--weights", "--latent-tile", "--color-fix", "--dtype"):
        assert option in result.output, option
    assert "--lambda-pix" not in result.output


def test_dry_run_prints_the_grid_and_plans(photos, tmp_path):
    result = run("sweep", photos, "-o", tmp_path / "out", "--dry-run", "--lambda-grid", GRID)
    assert result.exit_code == 0, result.output
    assert "6 points; per image 1 encode, UNet pix + pisa once, 6 decodes" in result.output
    assert result.output.count("passes pix+pisa") == 2
    assert not (tmp_path / "out").exists()


def test_points_keep_the_input_mode_as_upscale_does(tiny_base, pisa_pkl, tmp_path):
    # grey stays grey, alpha is upscaled apart and kept, 16 bits stay 16 bits: each point's
    # file is the one `pisa upscale` writes at its lambdas (the same model: bit for bit)
    from pisa_cli.core.random import random_pipeline
    from tests.builders import ramp16, save_png16
    from tests.fakes import run_on

    pipe = random_pipeline("tiny", torch.device("cpu"), torch.bfloat16, merged="pix")
    photos = tmp_path / "in"
    photos.mkdir()
    rgba = noise_image(20, 16, 1, "RGBA")
    rgba.putalpha(noise_image(20, 16, 2, "L"))
    rgba.save(photos / "rgba.png")
    noise_image(20, 16, 3, "L").save(photos / "grey.png")
    save_png16(ramp16(20, 16, 3, seed=4), photos / "deep.png")
    save_png16(ramp16(20, 16, 2, seed=5), photos / "deepgrey.png")
    common = ["--process-size", "64", *model_args(tiny_base, pisa_pkl)]
    swept = run_on(pipe, "sweep", photos, "-o", tmp_path / "sweep", "--lambda-grid",
                   "pix=1 sem=0.5", *common)  # fmt: skip
    assert swept.exit_code == 0, swept.output
    upscaled = run_on(pipe, "upscale", photos, "-o", tmp_path / "up", "--lambda-pix", "1",
                      "--lambda-sem", "0.5", *common)  # fmt: skip
    assert upscaled.exit_code == 0, upscaled.output
    expected = {"rgba": "RGBA", "grey": "L", "deep": "RGB;16", "deepgrey": "LA;16"}
    for name, mode in expected.items():
        ours = png_samples(tmp_path / "sweep" / name / "pix1.00_sem0.50.png")
        theirs = png_samples(tmp_path / "up" / f"{name}.png")
        assert ours[0] == theirs[0] == mode, name
        assert np.array_equal(ours[1], theirs[1]), name


def png_samples(path) -> tuple[str, np.ndarray]:
    """(mode as named in the tests, every sample) of a PNG of any depth."""
    import png

    _width, _height, rows, info = png.Reader(filename=str(path)).asDirect()
    names = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    mode = names[info["planes"]] + (";16" if info["bitdepth"] == 16 else "")
    return mode, np.vstack([np.asarray(row) for row in rows])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_points_are_upscale_s_files_as_each_command_loads_its_model(tmp_path, dtype):
    # `pisa upscale` merges the PiSA weights for equal lambdas, the sweep the pixel ones: in
    # bf16 the two round apart (up to 122 levels here), so the sweep also loads the model
    # upscale loads for those points; in fp32 they agree within float noise and it does not
    from pisa_cli.core.loading import merged_variant
    from pisa_cli.core.random import random_pipeline

    cpu, loaded = torch.device("cpu"), {}

    def factory(model, options):  # merged as the real loader merges for these options
        merged = merged_variant(options)
        if merged not in loaded:
            torch_dtype = resolve_dtype(model.dtype, cpu)
            loaded[merged] = random_pipeline("tiny", cpu, torch_dtype, merged=merged)
        return loaded[merged]

    def invoke(*args):
        common = ["--process-size", "64", "--dtype", dtype, "--device", "cpu"]
        words = [str(a) for a in (*args, *common, "--weights", tmp_path / "one.png")]
        result = runner.invoke(app, words, obj={"pipeline_factory": factory})
        assert result.exit_code == 0, result.output

    noise_image(20, 16, 1, "RGBA").save(tmp_path / "one.png")
    invoke(
        "sweep",
        tmp_path / "one.png",
        "-o",
        tmp_path / "sweep",
        "--lambda-grid",
        "pix=1 sem=0,0.5,1",
    )
    assert sorted(loaded) == (["pisa", "pix"] if dtype == "bf16" else ["pix"])
    for sem in ("0", "0.5", "1"):
        out = tmp_path / f"up{sem}"
        invoke("upscale", tmp_path / "one.png", "-o", out, "--lambda-pix", "1", "--lambda-sem", sem)
        ours = png_samples(tmp_path / "sweep" / "one" / f"pix1.00_sem{float(sem):.2f}.png")
        theirs = png_samples(out / "one.png")
        difference = np.abs(ours[1].astype(int) - theirs[1].astype(int)).max()
        # bf16 runs a batch's samples one by one (bit for bit); fp32's bound is batching's
        assert difference <= (0 if dtype == "bf16" else 3), (sem, difference)
