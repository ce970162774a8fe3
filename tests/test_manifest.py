"""The manifest after a failed append (disk full, a killed run): the cut record is one
line lost, said once; every record before and after it still counts."""

from __future__ import annotations

import errno
import logging

import pytest

import pisa_cli.imaging.manifest as manifest_module
from pisa_cli.imaging.manifest import MANIFEST_NAME, Manifest
from tests.builders import noise_image


@pytest.fixture
def folder(tmp_path):
    """Three inputs and their outputs, none recorded yet."""
    (tmp_path / "out").mkdir()
    pairs = []
    for index in range(3):
        source, output = tmp_path / f"in{index}.png", tmp_path / "out" / f"in{index}.png"
        noise_image(8, 8, index).save(source)
        noise_image(32, 32, index).save(output)
        pairs.append((source, output))
    return tmp_path / "out", pairs


class _DiskFull:
    """A file whose writes stop halfway, as on a full disk."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, text):
        self.handle.write(text[: len(text) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)


def _manifest_warnings(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == manifest_module.__name__ and record.levelno == logging.WARNING
    ]


def _check_all_kept(root, pairs, caplog) -> None:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = Manifest(root, {"a": 1})
    for source, output in pairs:
        assert again.decide(source, output).reason == "up to date", output
    assert again.unreadable_lines == 1
    warnings = _manifest_warnings(caplog)
    assert len(warnings) == 1 and MANIFEST_NAME in warnings[0], warnings


def test_a_failed_append_cuts_one_record_and_the_next_starts_on_a_new_line(
    folder, monkeypatch, caplog
):
    root, pairs = folder
    manifest = Manifest(root, {"a": 1})
    (first, first_out), (second, second_out), (third, third_out) = pairs
    manifest.record(first, first_out, first_out)
    real_open = open
    monkeypatch.setattr(
        manifest_module, "open", lambda *a, **k: _DiskFull(real_open(*a, **k)), raising=False
    )
    with pytest.raises(OSError):
        manifest.record(second, second_out, second_out)  # the writer reports it failed
    monkeypatch.undo()
    manifest.record(second, second_out, second_out)  # the same process goes on
    manifest.record(third, third_out, third_out)
    _check_all_kept(root, pairs, caplog)


def test_a_line_cut_by_another_process_does_not_swallow_the_next(folder, caplog):
    root, pairs = folder
    manifest = Manifest(root, {"a": 1})
    source, output = pairs[0]
    manifest.record(source, output, output)
    with open(root / MANIFEST_NAME, "a") as handle:  # a run killed mid-append, after we read
        handle.write('{"output": "gone.png", "settings_k')
    for source, output in pairs[1:]:
        manifest.record(source, output, output)
    _check_all_kept(root, pairs, caplog)


def test_a_record_glued_to_a_cut_line_is_still_read(folder, caplog):
    """Manifests written before this fix: the next record went onto the cut line."""
    root, pairs = folder
    manifest = Manifest(root, {"a": 1})
    for source, output in pairs:
        manifest.record(source, output, output)
    path = root / MANIFEST_NAME
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][: len(lines[1]) // 2] + lines[1] + lines[2])
    _check_all_kept(root, pairs, caplog)
