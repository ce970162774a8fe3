"""`pisa upscale` in a real process, killed or interrupted mid-run: no partial file, and a
rerun completes the set with the very bytes of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.builders import noise_image
from tests.helpers import check_partial_then_rerun, environment, pisa, temporaries, visible_bytes

REPO = Path(__file__).resolve().parents[1]
IMAGES = 8


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(IMAGES):
        image = noise_image(24, 20, index)
        if index % 4 == 1:
            image = image.convert("RGBA")
            image.putalpha(Image.linear_gradient("L").resize((24, 20)))
        elif index % 4 == 2:
            image = image.convert("L")
        image.save(folder / f"img{index:02d}.png")
    return folder


def start_and_wait_for_outputs(args: list[str], out: Path, count: int) -> subprocess.Popen:
    """Start a run and return once ``count`` outputs are in place. (The manifest records an
    output just before its rename, so its lines run ahead of the files: count the files.)"""
    process = subprocess.Popen(
        args, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.is_dir() and len(visible_bytes(out)) >= count:
            return process
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no {count} outputs in time: {process.communicate()}")


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_complete_identical_set(
    tiny_base, pisa_pkl, inputs, tmp_path
):
    model = ["--base-model", tiny_base, "--weights", pisa_pkl, "--device", "cpu"]
    common = [*model, "--process-size", "32", "--quiet"]
    reference = tmp_path / "reference"
    done = subprocess.run(
        pisa(inputs, "-o", reference, *common), env=environment(), text=True, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    expected = visible_bytes(reference)
    assert len(expected) == IMAGES

    out = tmp_path / "out"
    process = start_and_wait_for_outputs(pisa(inputs, "-o", out, *common), out, 3)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    partial = visible_bytes(out)
    assert 3 <= len(partial) < IMAGES
    check_partial_then_rerun(pisa(inputs, "-o", out, *common), environment(), out, expected)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_a_summary(tiny_base, pisa_pkl, inputs, tmp_path):
    model = ["--base-model", tiny_base, "--weights", pisa_pkl, "--device", "cpu"]
    out, report = tmp_path / "out", tmp_path / "report.json"
    args = pisa(inputs, "-o", out, *model, "--process-size", "32", "--report", report)
    process = start_and_wait_for_outputs(args, out, 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopping after the current image" in stderr
    assert "not done (run again to resume)" in stderr.splitlines()[-1]
    written = visible_bytes(out)
    assert 2 <= len(written) < IMAGES and not temporaries(out)
    for name in written:
        with Image.open(out / name) as image:
            assert np.asarray(image).shape[:2] == (80, 96)  # fully decodable, full size
    import json

    summary = json.loads(report.read_text())["summary"]
    assert summary["interrupted"] and summary["done"] == len(written)
    assert summary["not_done"] == IMAGES - len(written)
