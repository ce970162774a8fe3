"""Hostile files, round 2: manifests planted as links, folders or FIFOs, forged manifest
records, glob patterns through link loops, names that are not UTF-8 or hold invisible
characters in reports, reports and output folders that cannot be written."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from pisa_cli.fsutil import file_sha256
from pisa_cli.imaging.discover import discover
from pisa_cli.imaging.manifest import MANIFEST_NAME, Manifest
from pisa_cli.imaging.names import shown
from pisa_cli.options import BatchOptions
from tests.builders import noise_image
from tests.fakes import FakePipeline, run_on
from tests.helpers import visible


@pytest.fixture
def fake_model(tmp_path):
    """Options naming a weights file (only hashed) and a base model (only named)."""
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"fake weights")
    return ["--weights", weights, "--base-model", "fake-base", "--device", "cpu"]


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a", "b"):
        noise_image(8, 8, seed=ord(name)).save(folder / f"{name}.png")
    return folder


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


def upscale(pipeline, photos: Path, out: Path, fake_model, *more):
    return run_on(
        pipeline, "upscale", photos, "-o", out, *fake_model, "--process-size", "16", *more
    )


def errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


# --- the manifest: never through a link, never a folder or a FIFO ---------------------------


def test_a_manifest_planted_as_a_link_is_never_written_through(tmp_path, photos, fake_model):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).symlink_to(victim)
    result = upscale(None, photos, out, fake_model)  # refused before the model loads
    assert result.exit_code == 1, result.output
    assert errors(result) == [
        f"error: {out / MANIFEST_NAME}: the manifest is a link, not a file; pisa never "
        "writes through a link in the output folder: remove the link"
    ]
    assert victim.read_text() == "the user's own file\n"
    assert visible(out) == []
    # a link planted after the check (a rank's file, a race) is refused by the append itself
    manifest = Manifest(out, {"a": 1}, rank=3)
    manifest.path.symlink_to(victim)
    output = out / "a.png"
    noise_image(32, 32).save(output)
    with pytest.raises(OSError):
        manifest.record(photos / "a.png", output, output)
    assert victim.read_text() == "the user's own file\n"


def test_a_manifest_that_is_a_folder_is_one_line_before_the_model(tmp_path, photos, fake_model):
    out = tmp_path / "out"
    (out / MANIFEST_NAME).mkdir(parents=True)
    result = upscale(None, photos, out, fake_model)
    assert result.exit_code == 1, result.output
    assert len(errors(result)) == 1 and "the manifest is a folder, not a file" in result.output
    assert "failed" not in result.output  # no line per image
    assert visible(out) == []


def test_a_fifo_where_a_recorded_output_was_is_not_opened(tmp_path, photos, fake_model):
    out = tmp_path / "out"
    assert upscale(FakePipeline(), photos, out, fake_model).exit_code == 0
    (out / "a.png").unlink()
    os.mkfifo(out / "a.png")
    with deadline(30):
        result = upscale(None, photos, out, fake_model)  # nothing to redo: no model
    assert result.exit_code == 0, result.output
    assert f"warning: {out / 'a.png'} exists and is a FIFO: kept" in result.output
    assert "0 done, 2 skipped, 0 failed" in result.output
    with deadline(30), pytest.raises(OSError, match="not a regular file"):
        file_sha256(out / "a.png")


# --- forged records ---------------------------------------------------------------------------


def _forge(manifest: Path, **changes) -> None:
    """Append a copy of the manifest's first record with ``changes``."""
    record = json.loads(manifest.read_text().splitlines()[0])
    record.update(changes)
    with manifest.open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def test_records_of_outputs_outside_the_folder_hide_no_input(tmp_path, photos, fake_model):
    out = tmp_path / "out"
    assert upscale(FakePipeline(), photos, out, fake_model).exit_code == 0
    _forge(out / MANIFEST_NAME, output="../photos/a.png")
    _forge(out / MANIFEST_NAME, output=str(photos / "a.png"))
    (out / "a.png").unlink()
    result = upscale(FakePipeline(), photos, out, fake_model)
    assert result.exit_code == 0, result.output
    assert "1 done, 1 skipped, 0 failed" in result.output  # a.png is redone, not hidden
    warnings = [line for line in result.output.splitlines() if "outside the folder" in line]
    assert len(warnings) == 1 and "2 records ignored" in warnings[0], result.output
    assert visible(out) == ["a.png", "b.png"]


FIELDS = (
    "output",
    "settings_key",
    "source_bytes",
    "source_mtime_ns",
    "output_bytes",
    "output_mtime_ns",
    "output_sha256",
)
HOSTILE = ("Infinity", "-Infinity", "NaN", "1e400", "1.5", "true", '"12"', "-1", "null", "[]", "{}")


def test_every_field_of_a_record_is_checked(tmp_path, photos, caplog):
    out = tmp_path / "out"
    out.mkdir()
    pairs = [(photos / name, out / name) for name in ("a.png", "b.png")]
    manifest = Manifest(out, {"a": 1})
    for source, output in pairs:
        noise_image(32, 32).save(output)
        manifest.record(source, output, output)
    path = out / MANIFEST_NAME
    first, second = path.read_text().splitlines()
    record = json.loads(first)
    forged = []
    for field in FIELDS:
        for value in HOSTILE:
            if field in ("source_mtime_ns", "output_mtime_ns") and value == "-1":
                continue  # a file of 1969: a time, not out of range
            if field in ("output", "settings_key") and value == '"12"':
                continue  # a name and a key like any other
            text = json.dumps({**record, field: "VALUE"}, sort_keys=True)
            forged.append(text.replace('"VALUE"', value))
    forged.append(json.dumps({**record, "output_sha256": "not hex"}, sort_keys=True))
    forged.append(json.dumps({k: v for k, v in record.items() if k != "output_bytes"}))
    forged += ["[1, 2]", '"a string"', "12"]
    path.write_text("\n".join([first, *forged, second]) + "\n")
    with caplog.at_level(logging.WARNING):
        again = Manifest(out, {"a": 1})
    for source, output in pairs:  # the records around them still count
        assert again.decide(source, output).reason == "up to date"
    assert again.outputs() == {(out / "a.png").resolve(), (out / "b.png").resolve()}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{path}: {len(forged)} records skipped: a field missing, of another type or out of "
        "range (not written by pisa)"
    ]


def test_a_forged_manifest_gives_one_warning_not_a_traceback(tmp_path, photos, fake_model):
    out = tmp_path / "out"
    assert upscale(FakePipeline(), photos, out, fake_model).exit_code == 0
    path = out / MANIFEST_NAME
    lines = path.read_text().splitlines()
    path.write_text(
        "\n".join(line.replace('"source_mtime_ns": ', '"source_mtime_ns": 1e400, "x": ')
                  for line in lines) + "\n"
    )  # fmt: skip
    result = upscale(FakePipeline(), photos, out, fake_model)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "2 records skipped" in result.output, result.output
    assert "0 done, 2 skipped" in result.output  # not written by pisa now: kept


# --- glob patterns through link loops ---------------------------------------------------------


def _discover_within(seconds: int, *args, **kwargs):
    box: dict = {}
    walker = threading.Thread(
        target=lambda: box.update(found=discover(*args, **kwargs)), daemon=True
    )
    walker.start()
    walker.join(timeout=seconds)
    assert not walker.is_alive(), "the walk did not end"
    return box["found"]


@pytest.mark.parametrize("links", [["a"], ["a", "b"]])
@pytest.mark.parametrize("recursive", [False, True])
def test_a_glob_through_link_loops_ends_and_shows_each_image_once(
    tmp_path, monkeypatch, links, recursive
):
    monkeypatch.chdir(tmp_path)
    Path("in/sub").mkdir(parents=True)
    noise_image(8, 8).save("in/x.png")
    noise_image(8, 8).save("in/sub/y.png")
    for name in links:
        Path("in", name).symlink_to(".")
    batch = BatchOptions(recursive=recursive)
    found = _discover_within(20, ["in/**/*.png"], Path("out"), batch=batch)
    assert sorted(str(job.source) for job in found.jobs) == ["in/sub/y.png", "in/x.png"]
    assert sorted(job.output.as_posix() for job in found.jobs) == (
        ["out/sub/y.png", "out/x.png"] if recursive else ["out/x.png", "out/y.png"]
    )
    assert found.loops == [
        f"in/{name}: a link to a folder already searched ({tmp_path / 'in'})" for name in links
    ]


def test_a_glob_finds_what_python_glob_finds_without_loops(tmp_path, monkeypatch):
    import glob

    from pisa_cli.imaging.discover import expand

    monkeypatch.chdir(tmp_path)
    for folder in ("in/a/b", "in/.h", "in/c"):
        Path(folder).mkdir(parents=True)
    for name in ("in/x.png", "in/a/y.png", "in/a/b/z.PNG", "in/.h/w.png", "in/c/.v.png"):
        Path(name).touch()
    patterns = ["in/**/*.png", "**/*.png", "in/**", "in/*/**/*.png", "in/**/.h/*", "in/**/.*"]
    patterns.append(str(tmp_path / "in/**/*"))
    for pattern in patterns:
        ours = {os.path.normpath(path) for path in expand(pattern, print)}
        theirs = {os.path.normpath(path) for path in glob.glob(pattern, recursive=True)}
        assert ours == theirs, pattern


# --- reports ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_a_report_names_a_file_that_is_not_utf8(tmp_path, fake_model, kind):
    folder = tmp_path / "photos"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"bad\xffbyte.png")
    noise_image(8, 8).save(raw, format="PNG")
    report = tmp_path / f"report.{kind}"
    result = upscale(FakePipeline(), folder, tmp_path / "out", fake_model, "--report", report)
    assert result.exit_code == 0, result.output
    text = report.read_text(encoding="utf-8")  # strict: no lone surrogate
    if kind == "csv":
        (row,) = csv.DictReader(text.splitlines())
    else:
        (row,) = json.loads(text)["images"]
        assert "\\udc" not in text
    assert row["input"] == f"{folder}/bad\\xffbyte.png"
    assert row["output"] == f"{tmp_path / 'out'}/bad\\xffbyte.png"
    assert row["status"] == "done"


def test_report_cells_hide_no_control_or_format_character(tmp_path, fake_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(8, 8).save(folder / "a\u200bb\u202ec\x1b.png")
    report = tmp_path / "report.csv"
    result = upscale(FakePipeline(), folder, tmp_path / "out", fake_model, "--report", report)
    assert result.exit_code == 0, result.output
    (row,) = csv.DictReader(report.open(encoding="utf-8", newline=""))
    assert row["input"].endswith("a\\u200bb\\u202ec\\x1b.png")


@pytest.mark.parametrize("where", ["proc", "folder", "under a file", "fifo"])
def test_a_report_that_cannot_be_written_is_refused_before_the_run(
    tmp_path, photos, fake_model, where
):
    (tmp_path / "taken.json").mkdir()
    (tmp_path / "file").write_text("a file")
    os.mkfifo(tmp_path / "pipe.json")
    report = {
        "proc": Path("/proc/self/report.json"),
        "folder": tmp_path / "taken.json",
        "under a file": tmp_path / "file" / "report.json",
        "fifo": tmp_path / "pipe.json",
    }[where]
    out = tmp_path / "out"
    result = upscale(None, photos, out, fake_model, "--report", report)  # no model loaded
    assert result.exit_code == 2, result.output
    (line,) = errors(result)
    assert line.startswith(f"error: --report {report}: "), line
    assert not out.exists()


def test_a_report_in_a_folder_still_to_make_is_accepted(tmp_path, photos, fake_model):
    report = tmp_path / "out" / "reports" / "r.json"
    result = upscale(FakePipeline(), photos, tmp_path / "out", fake_model, "--report", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["summary"]["done"] == 2


# --- -o that is not a folder ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["a file", "a device", "a link to nothing"])
def test_an_output_that_is_not_a_folder_is_said_so(tmp_path, photos, fake_model, kind):
    out = {"a file": tmp_path / "taken.txt", "a device": Path("/dev/null")}.get(
        kind, tmp_path / "dangling"
    )
    if kind == "a file":
        out.write_text("kept")
    elif kind == "a link to nothing":
        out.symlink_to(tmp_path / "nowhere")
    result = upscale(None, photos, out, fake_model)
    assert result.exit_code == 1, result.output
    assert errors(result) == [
        f"error: {out}: not a folder ({kind}); -o names the folder to write in"
    ]
    if kind == "a file":
        assert out.read_text() == "kept"
    assert not (tmp_path / "nowhere").exists()


def test_a_sweep_into_a_file_is_said_so(tmp_path, photos, fake_model):
    taken = tmp_path / "taken.txt"
    taken.write_text("kept")
    result = run_on(None, "sweep", photos / "a.png", "-o", taken, *fake_model)
    assert result.exit_code == 1, result.output
    assert errors(result) == [
        f"error: {taken}: not a folder (a file); -o names the folder to write in"
    ]
    assert taken.read_text() == "kept"


# --- invisible characters in names -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("a\u200bb.png", "a\\u200bb.png"),  # zero-width space
        ("a\u200db.png", "a\\u200db.png"),  # zero-width joiner
        ("\ufeffa.png", "\\ufeffa.png"),  # byte-order mark
        ("a\u00adb.png", "a\\xadb.png"),  # soft hyphen
        ("a\u2060b.png", "a\\u2060b.png"),  # word joiner
        ("evil\u202egnp.exe", "evil\\u202egnp.exe"),  # right-to-left override
        ("a\U000e0041.png", "a\\U000e0041.png"),  # a tag character, past U+FFFF
    ],
)
def test_invisible_format_characters_are_shown_escaped(name, escaped):
    assert shown(name) == escaped


def test_invisible_names_are_escaped_on_the_terminal(tmp_path, fake_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(8, 8).save(folder / "a\u200b.png")
    result = upscale(FakePipeline(), folder, tmp_path / "out", fake_model)
    assert result.exit_code == 0
    assert "\u200b" not in result.output and "a\\u200b.png" in result.output


def test_an_atomic_write_replaces_a_link_and_takes_nothing_from_its_target(tmp_path):
    from pisa_cli.fsutil import atomic_path

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file")
    victim.chmod(0o604)
    final = tmp_path / "out.png"
    final.symlink_to(victim)
    with atomic_path(final) as temp:
        temp.write_bytes(b"ours")
    assert not final.is_symlink() and final.read_bytes() == b"ours"
    assert victim.read_text() == "the user's own file"
    assert final.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not the target's 0o604


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
