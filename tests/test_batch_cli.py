"""`pisa upscale` on folders, in process on a fake pipeline (what these tests check is the
batch, not the model's pixels): resume, collisions, trees, formats, the report."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from tests.builders import noise_image
from tests.fakes import run_fake, run_on
from tests.helpers import model_args, visible


@pytest.fixture
def models(tiny_base, pisa_pkl):
    return [*model_args(tiny_base, pisa_pkl), "--process-size", "32"]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(16, 12, 1).save(folder / "one.png")
    noise_image(12, 12, 2).save(folder / "two.jpg", quality=95)
    return folder


def state(folder):
    """Bytes and modification time of every visible file."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def test_rerun_with_the_same_settings_skips_everything(models, photos, tmp_path):
    out = tmp_path / "out"
    assert run_fake("upscale", photos, "-o", out, *models).exit_code == 0
    before = state(out)
    again = run_fake("upscale", photos, "-o", out, *models)
    assert again.exit_code == 0, again.output
    assert "2 outputs up to date" in again.output and "0 done, 2 skipped, 0 failed" in again.output
    assert state(out) == before  # not even rewritten


def test_rerun_with_nothing_to_do_does_not_load_the_model(models, photos, tmp_path):
    out = tmp_path / "out"
    assert run_fake("upscale", photos, "-o", out, *models).exit_code == 0
    same = run_on(None, "upscale", photos, "-o", out, *models)  # any load fails the command
    assert same.exit_code == 0 and "0 done, 2 skipped" in same.output
    other = run_on(None, "upscale", photos, "-o", out, *models, "--lambda-sem", "0.5")
    assert isinstance(other.exception, AssertionError)  # other settings: it had to load


def test_rerun_with_changed_settings_redoes_stale_outputs(models, photos, tmp_path):
    out = tmp_path / "out"
    assert run_fake("upscale", photos, "-o", out, *models).exit_code == 0
    first = np.asarray(Image.open(out / "one.png"))
    again = run_fake("upscale", photos, "-o", out, *models, "--lambda-sem", "0.3")
    assert again.exit_code == 0, again.output
    assert "2 outputs will be redone: settings changed" in again.output
    assert "2 done, 0 skipped" in again.output
    assert not np.array_equal(first, np.asarray(Image.open(out / "one.png")))
    third = run_fake("upscale", photos, "-o", out, *models, "--lambda-sem", "0.3")
    assert "0 done, 2 skipped" in third.output


def test_a_changed_input_is_redone_alone(models, photos, tmp_path):
    out = tmp_path / "out"
    assert run_fake("upscale", photos, "-o", out, *models).exit_code == 0
    noise_image(16, 12, 7).save(photos / "one.png")
    again = run_fake("upscale", photos, "-o", out, *models)
    assert "1 done, 1 skipped" in again.output and "input changed" in again.output


def test_files_not_written_by_pisa_are_kept_unless_overwrite(models, photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = noise_image(5, 5, 3)
    mine.save(out / "one.png")
    result = run_fake("upscale", photos, "-o", out, *models)
    assert result.exit_code == 0
    assert "one.png exists and was not written by pisa: kept" in result.output
    assert Image.open(out / "one.png").size == (5, 5)
    forced = run_fake("upscale", photos, "-o", out, *models, "--overwrite")
    assert "2 done, 0 skipped" in forced.output
    assert Image.open(out / "one.png").size == (64, 48)


def test_same_stem_different_extensions_give_two_outputs(models, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    noise_image(16, 12, 4).save(folder / "a.png")
    noise_image(16, 12, 5).save(folder / "a.jpg", quality=95)
    out = tmp_path / "out"
    result = run_fake("upscale", folder, "-o", out, *models)
    assert result.exit_code == 0, result.output
    assert visible(out) == ["a_jpg.png", "a_png.png"]
    a, b = (np.asarray(Image.open(out / name)) for name in visible(out))
    assert not np.array_equal(a, b)


def test_recursive_mirrors_sub_folders(models, tmp_path):
    root = tmp_path / "in"
    (root / "x" / "y").mkdir(parents=True)
    noise_image(16, 12, 6).save(root / "x" / "y" / "deep.png")
    noise_image(16, 12, 7).save(root / "top.png")
    out = tmp_path / "out"
    flat = run_fake("upscale", root, "-o", out, *models)
    assert "1 sub-folders not searched (--recursive)" in flat.output
    result = run_fake("upscale", root, "-o", out, *models, "--recursive")
    assert result.exit_code == 0, result.output
    assert (out / "x" / "y" / "deep.png").is_file() and (out / "top.png").is_file()


def test_format_quality_and_suffix(models, photos, tmp_path):
    out = tmp_path / "out"
    args = ["--format", "jpg", "--quality", "80", "--suffix", "_x4"]
    result = run_fake("upscale", photos, "-o", out, *models, *args)
    assert result.exit_code == 0, result.output
    assert visible(out) == ["one_x4.jpg", "two_x4.jpg"]
    assert Image.open(out / "one_x4.jpg").format == "JPEG"


def test_same_format_and_output_in_the_input_folder(models, photos):
    result = run_fake("upscale", photos, "-o", photos, *models, "--format", "same")
    assert result.exit_code == 1
    assert result.output.count("the output would replace the input") == 2
    fine = run_fake("upscale", photos, "-o", photos, *models, "--format", "same", "--suffix", "_x4")
    assert fine.exit_code == 0 and "2 done" in fine.output
    # the outputs are in the manifest: a rerun does not take them as inputs
    again = run_fake(
        "upscale", photos, "-o", photos, *models, "--format", "same", "--suffix", "_x4"
    )
    assert "0 done, 2 skipped" in again.output
    assert visible(photos) == ["one.png", "one_x4.png", "two.jpg", "two_x4.jpg"]


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_report(models, photos, tmp_path, suffix):
    (photos / "bad.png").write_bytes(b"")
    report = tmp_path / f"report{suffix}"
    result = run_fake("upscale", photos, "-o", tmp_path / "out", *models, "--report", report)
    assert result.exit_code == 1
    if suffix == ".json":
        data = json.loads(report.read_text())
        assert data["summary"]["done"] == 2 and data["summary"]["failed"] == 1
        assert data["settings"]["upscale"]["process_size"] == 32
        rows = {row["input"].rsplit("/", 1)[-1]: row for row in data["images"]}
    else:
        with open(report, newline="") as handle:
            rows = {row["input"].rsplit("/", 1)[-1]: row for row in csv.DictReader(handle)}
    assert rows["bad.png"]["status"] == "failed" and "empty file" in rows["bad.png"]["error"]
    one = rows["one.png"]
    assert one["status"] == "done" and one["reason"] == "new" and one["family"] == "pisa-sr"
    assert [str(one[k]) for k in ("input_width", "output_width", "output_height")] == [
        "16",
        "64",
        "48",
    ]
    for stage in ("read", "encode", "unet", "decode", "write"):
        assert float(one[f"{stage}_seconds"]) >= 0


def test_a_report_with_another_extension_is_refused_first(photos, tmp_path):
    result = run_fake("upscale", photos, "-o", tmp_path / "out", "--report", tmp_path / "r.txt")
    assert result.exit_code == 2 and "must end in .json or .csv" in result.output


def test_plain_lines_when_not_a_terminal_and_quiet(models, photos, tmp_path):
    (photos / "bad.png").write_bytes(b"")
    result = run_fake("upscale", photos, "-o", tmp_path / "a", *models)
    lines = result.output.splitlines()
    assert any(line.startswith("[1/3] failed") and "bad.png" in line for line in lines)
    assert any(line.startswith("[2/3] done") and "one.png" in line for line in lines)
    quiet = run_fake("upscale", photos, "-o", tmp_path / "b", *models, "--quiet")
    assert [line.split()[0] for line in quiet.output.splitlines()] == ["failed", "2"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "gif"], "--format 'gif' is not one of png, jpg, webp, tiff, same"),
        (["--quality", "0"], "--quality 0 must be from 1 to 100"),
        (["--suffix", "a/b"], "--suffix 'a/b' must not hold a path separator"),
        (["--max-pixels", "0"], "--max-pixels 0 must be at least 1"),
    ],
)
def test_bad_batch_options_exit_2(photos, tmp_path, args, message):
    result = run_fake("upscale", photos, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()
