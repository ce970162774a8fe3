"""Hostile and unlucky inputs: names that would forge output or climb out of -o, folder
loops, FIFOs, pixel limits on every path, failing before the model loads, help texts."""

from __future__ import annotations

import csv
import os
import re
import signal
import struct
import threading
import unicodedata
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from pisa_cli.cli import app
from pisa_cli.imaging.discover import discover
from pisa_cli.imaging.names import FORMULA_STARTS, csv_cell, safe_stem, shown
from pisa_cli.options import UpscaleOptions
from tests.builders import noise_image
from tests.fakes import FakePipeline, run_on

SUMMARY = re.compile(r"^\d+ done, \d+ skipped, \d+ failed")


@pytest.fixture
def fake_model(tmp_path):
    """Options naming a weights file (only hashed) and a base model (only named): with a
    fake pipeline the CLI runs end to end without a model."""
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"fake weights")
    return ["--weights", weights, "--base-model", "fake-base", "--device", "cpu"]


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging forever."""

    def expired(number, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- names: shown escaped, safe output names, CSV cells -------------------------------------


NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=40)
ANY_TEXT = st.text(st.characters(), max_size=40)


@given(ANY_TEXT)
def test_shown_names_are_one_printable_line(text):
    line = shown(text)
    for char in line:
        assert unicodedata.category(char) not in ("Cc", "Cf", "Cs", "Zl", "Zp"), repr(line)
    assert "\u202e" not in line and "\u2066" not in line
    line.encode("utf-8")  # no lone surrogate left to crash the terminal's encoder
    if text.isprintable():
        assert line == text  # accents, scripts and spaces are kept as they are


def test_shown_escapes_say_which_character():
    assert shown("a\nb\rc\td\x1b[31me\x85f\x7f") == "a\\nb\\rc\\td\\x1b[31me\\x85f\\x7f"
    assert shown("evil\u202egnp.exe") == "evil\\u202egnp.exe"
    assert shown(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"  # an undecodable byte


@given(NAMES)
def test_safe_stems_stay_in_their_folder_and_visible(stem):
    safe = safe_stem(stem)
    assert safe not in ("", ".", "..") and not safe.startswith(".")
    assert "/" not in safe and "\\" not in safe
    root = Path("/output")
    assert (root / f"{safe}.png").parent == root
    assert os.path.normpath(root / safe).startswith("/output/")


@given(ANY_TEXT)
def test_csv_cells_never_start_a_formula(text):
    import io

    buffer = io.StringIO()
    csv.writer(buffer).writerow([csv_cell(text)])
    cell = next(csv.reader(io.StringIO(buffer.getvalue()), strict=True) or [[""]])
    if cell:
        assert not cell[0].startswith(FORMULA_STARTS)
        assert cell[0] in (text, "'" + text)


def test_a_stem_of_dots_cannot_leave_the_output_folder(tmp_path):
    source = tmp_path / "tv"
    source.mkdir()
    for name in ("...png", "..png", ".hidden.png"):
        noise_image(8, 8).save(source / name, format="PNG")
    out = source / "parent" / "sweeps"
    named = [source / "...png", source / "..png", source / ".hidden.png"]
    for extension in ("", ".png"):  # a sweep's folder, an upscale's file
        found = discover(named, out, extension=extension)
        outputs = [job.output for job in found.jobs]
        assert len(outputs) == 3
        for output in outputs:
            assert output.resolve().parent == out.resolve(), output
            assert not output.name.startswith(".")
    assert sorted(o.name for o in outputs) == ["_...png", "_..png", "_.hidden.png"]


def test_a_link_in_the_output_folder_cannot_lead_writes_outside(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    noise_image(8, 8).save(photos / "sub" / "a.png")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)
    from pisa_cli.options import BatchOptions

    found = discover([photos], out, batch=BatchOptions(recursive=True))
    assert found.jobs == []
    assert any("would land outside" in line for line in found.unreadable)


def test_a_sweep_into_a_linked_folder_is_refused(tmp_path):
    from pisa_cli.errors import ImageError
    from pisa_cli.sweep.run import staged_folder

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "photo").symlink_to(elsewhere)
    with pytest.raises(ImageError, match="is a link"), staged_folder(tmp_path / "photo"):
        pass
    assert list(elsewhere.iterdir()) == []


FORGED = "x.png\n0 done, 0 skipped, 0 failed in 1.0 s.png"


def test_a_file_name_cannot_forge_a_summary_line(tmp_path, fake_model, monkeypatch):
    fake = FakePipeline()
    photos = tmp_path / "photos"
    photos.mkdir()
    noise_image(8, 8).save(photos / FORGED, format="PNG")
    (photos / "bad\x1b[2J.png").write_bytes(b"not an image")
    result = run_on(
        fake, "upscale", photos, "-o", tmp_path / "out", *fake_model, "--process-size", "16"
    )
    lines = result.output.splitlines()
    assert sum(bool(SUMMARY.match(line)) for line in lines) == 1, result.output
    assert "\x1b" not in result.output
    assert "x.png\\n0 done" in result.output and "bad\\x1b[2J.png" in result.output


def test_report_cells_cannot_run_as_formulas(tmp_path, fake_model, monkeypatch):
    fake = FakePipeline()
    photos = tmp_path / "photos"
    photos.mkdir()
    name = "=cmd|' \\C calc'!A0.png"  # a '/' cannot be in a file name
    noise_image(8, 8).save(photos / name, format="PNG")
    (photos / "@bad.png").write_bytes(b"")
    (photos / "-x.png").write_bytes(b"not an image")
    monkeypatch.chdir(photos)  # relative names: the cells start with the names
    report = tmp_path / "report.csv"
    run_on(fake, "upscale", ".", "-o", tmp_path / "out", *fake_model, "--report", report)
    rows = list(csv.DictReader(report.open(newline="", encoding="utf-8")))
    assert len(rows) == 3
    for row in rows:
        for value in row.values():
            assert not value.startswith(FORMULA_STARTS), row
    inputs = {row["input"] for row in rows}
    assert inputs == {"'" + name, "'@bad.png", "'-x.png"}
    errors = {row["error"] for row in rows if row["error"]}
    assert errors and all(error.startswith("'") for error in errors)


# --- folders that never end, files that never open ------------------------------------------


def test_symlink_loops_are_walked_once_and_named(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    noise_image(8, 8).save(photos / "a.png")
    noise_image(8, 8).save(photos / "sub" / "b.png")
    (photos / "self").symlink_to(".")
    (photos / "sub" / "loop").symlink_to("..")
    from pisa_cli.options import BatchOptions

    box: dict = {}
    walker = threading.Thread(
        target=lambda: box.update(
            found=discover([photos], tmp_path / "out", batch=BatchOptions(recursive=True))
        ),
        daemon=True,
    )
    walker.start()
    walker.join(timeout=20)
    assert not walker.is_alive(), "the walk did not end"
    found = box["found"]
    assert sorted(job.source.name for job in found.jobs) == ["a.png", "b.png"]
    assert len(found.loops) == 2 and all("already searched" in line for line in found.loops)


def test_a_fifo_is_refused_in_one_line_without_blocking(tmp_path, fake_model, monkeypatch):
    fake = None  # any model load fails the command
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    found = discover([fifo], tmp_path / "out")
    assert found.jobs == [] and found.unreadable == [f"{fifo}: not a regular file or a folder"]
    with deadline(60):
        result = run_on(fake, "upscale", fifo, "-o", tmp_path / "out", *fake_model)
    assert result.exit_code == 1
    assert f"error: {fifo}: not a regular file or a folder" in result.output.splitlines()
    with deadline(60):
        assert (
            run_on(fake, "upscale", "/dev/zero", "-o", tmp_path / "out", *fake_model).exit_code == 1
        )


# --- pixel limits on every path --------------------------------------------------------------


def png_with_late_exif(path: Path, size: tuple[int, int], orientation: int) -> None:
    """A PNG whose eXIf chunk comes after the pixels (Pillow decodes the image to find it)."""
    Image.new("L", size).save(path, format="PNG")
    data = path.read_bytes()
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])


def test_sizes_are_read_without_decoding_the_pixels(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    from pisa_cli.imaging.io import read_picture, read_size

    path = tmp_path / "rotated.png"
    png_with_late_exif(path, (300, 200), orientation=6)
    assert read_picture(path).size == (200, 300)  # the decoder sees the late chunk

    def decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", decoding)
    assert read_size(path) == (200, 300)


def test_a_dry_run_refuses_what_the_run_refuses(tmp_path, tiny_base):
    big = tmp_path / "big.png"
    noise_image(64, 64).save(big)
    args = ("upscale", big, "-o", tmp_path / "out", "--base-model", tiny_base, "--dry-run")
    result = run_on(None, *args, "--device", "cpu", "--max-pixels", "1000")
    assert "more than --max-pixels 1,000" in result.output
    assert "->" not in result.output  # no plan for it
    assert "->" in run_on(None, *args, "--device", "cpu").output


def test_a_strip_is_refused_before_it_is_enlarged(tmp_path, fake_model, monkeypatch):
    fake = None  # any model load fails the command
    strip = tmp_path / "strip.png"
    Image.new("RGB", (20000, 1)).save(strip)
    out = tmp_path / "out"
    result = run_on(fake, "upscale", strip, "-o", out, *fake_model, "--max-pixels", "1000000")
    assert result.exit_code == 1
    line = next(line for line in result.output.splitlines() if "failed" in line)
    assert "enlarged to 2560000x128" in line and "--max-pixels" in line, line
    assert not out.exists()


def test_check_pixels_bounds_the_model_input():
    from pisa_cli.core.planning import check_pixels
    from pisa_cli.errors import ImageError

    options = UpscaleOptions()
    check_pixels("a.png", (1000, 800), options, 1000 * 800)
    with pytest.raises(ImageError, match="more than --max-pixels"):
        check_pixels("a.png", (1001, 800), options, 1000 * 800)
    with pytest.raises(ImageError, match="enlarged to 12800x128"):
        check_pixels("a.png", (100, 1), options, 1_000_000)  # 100 px, enlarged 16384 times


def test_sharding_reads_no_pixels_and_weighs_refused_images_lightly(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    from pisa_cli.batch.distributed import pixel_weights

    huge = tmp_path / "huge.png"
    png_with_late_exif(huge, (3000, 3000), orientation=1)
    small = tmp_path / "small.png"
    noise_image(64, 64).save(small)

    def decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", decoding)
    weights = pixel_weights([huge, small], max_pixels=1000 * 1000)
    assert weights[0] <= weights[1]  # refused at once on its rank: nearly no work


# --- failing before the model loads, leaving nothing behind ---------------------------------


def test_a_batch_of_bad_inputs_fails_without_loading_the_model(tmp_path, fake_model, monkeypatch):
    fake = None  # any model load fails the command
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "text.png").write_text("not an image")
    (photos / "empty.jpg").write_bytes(b"")
    noise_image(40, 40).save(photos / "big.png")
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    args = ("upscale", photos, "-o", out, *fake_model, "--max-pixels", "1000", "--report", report)
    result = run_on(fake, *args)
    assert result.exit_code == 1, result.output
    assert "0 done, 0 skipped, 3 failed" in result.output
    assert (
        sum(
            line.startswith(f"[{i}/3] failed ")
            for i in (1, 2, 3)
            for line in result.output.splitlines()
        )
        == 3
    )
    assert not out.exists()
    assert report.exists()


def test_an_unwritable_output_folder_fails_before_the_model_loads(
    tmp_path, fake_model, monkeypatch
):
    fake = None  # any model load fails the command
    noise_image(8, 8).save(tmp_path / "a.png")
    result = run_on(fake, "upscale", tmp_path / "a.png", "-o", "/proc/self", *fake_model)
    assert result.exit_code == 1
    assert "error: /proc/self: cannot write into the output folder" in result.output


def test_a_run_that_writes_nothing_leaves_no_folder(tmp_path, fake_model, monkeypatch):
    fake = FakePipeline(fail=True)
    noise_image(8, 8).save(tmp_path / "a.png")
    out = tmp_path / "new" / "out"
    result = run_on(
        fake, "upscale", tmp_path / "a.png", "-o", out, *fake_model, "--process-size", "16"
    )
    assert result.exit_code == 1 and fake.calls == 1
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    run_on(fake, "upscale", tmp_path / "a.png", "-o", kept, *fake_model, "--process-size", "16")
    assert kept.is_dir()  # not ours to remove


# --- unusual settings are said once -----------------------------------------------------------


def test_unusual_settings_are_said_once_per_run(tmp_path, fake_model, monkeypatch):
    fake = FakePipeline()
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        noise_image(8, 8, index).save(photos / f"{index}.png")
    result = run_on(fake,
        "upscale", photos, "-o", tmp_path / "out", *fake_model, "--scale", "2",
        "--lambda-sem", "-0.5", "--process-size", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert "--scale 2" in warnings[0] and "trained for x4" in warnings[0]
    assert "--lambda-sem -0.5" in warnings[1]
    usual = run_on(
        fake, "upscale", photos, "-o", tmp_path / "out2", *fake_model, "--process-size", "16"
    )
    assert "warning:" not in usual.output


# --- help that reads as written ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["upscale", "sweep", "convert", "doctor", "bench", None])
def test_help_reads_as_written(command):
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0
    text = result.output
    for raw in ("<bool>", "<list[", "{inputs}", "{INPUTS}", "``", "[/"):
        assert raw not in text, raw
    if command == "sweep":
        assert "pisa-cli[metrics]" in text
    if command in ("upscale", "sweep"):
        assert "INPUTS..." in text
        # a docstring paragraph flows as one: no line ends mid-sentence at the source's width
        assert "whatever the grid's size" in text or command == "upscale"


def test_bench_list_gives_whole_descriptions():
    result = CliRunner().invoke(app, ["bench", "--list"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "``" not in text
    assert "in turn and streamed." in text  # the first paragraph, not its first source line


def test_the_readme_shows_a_pipx_install_of_the_cpu_build():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^pipx install .*$", readme, flags=re.MULTILINE)
    cpu = [line for line in commands if "download.pytorch.org/whl/cpu" in line]
    assert cpu and "--pip-args=" in cpu[0], commands
    assert any("whl/cpu" not in line for line in commands)  # and the one for GPUs
