"""`pisa upscale` as two processes for real, under torchrun (each rank runs --shard
RANK/WORLD_SIZE; accelerate launch runs torchrun's launcher, and its variables are mapped in
test_distributed) and with --devices cpu,cpu (the real model on two Ray workers): the
outputs of one process byte for byte, each image run once, one report part per share; a
rank killed mid-run leaves complete outputs and a rerun (any number of processes) finishes
the set."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pisa_cli.imaging.manifest import Manifest
from tests.builders import noise_image
from tests.helpers import (
    check_partial_then_rerun,
    environment,
    not_ours,
    pisa,
    temporaries,
    visible_bytes,
)

SIZES = [(24, 20), (40, 32), (16, 16), (56, 40), (24, 24), (32, 20), (20, 28), (48, 36)]
IMAGES = 16


def torchrun(*args: object) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc-per-node", "2", "-m", "pisa_cli", "upscale", *map(str, args)]


def rank_environment() -> dict[str, str]:
    env = environment()
    env["PISA_RANK_TIMEOUT"] = "60"  # a dead rank is seen in seconds anyway (SIGTERM path)
    return env


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Images of many sizes (the shares differ in count, not in pixels) and modes."""
    folder = tmp_path_factory.mktemp("mixed")
    for index in range(IMAGES):
        width, height = SIZES[index % len(SIZES)]
        image = noise_image(width + index, height, index)
        if index % 5 == 1:
            image = image.convert("RGBA")
            image.putalpha(Image.linear_gradient("L").resize(image.size))
        elif index % 5 == 2:
            image = image.convert("L")
        image.save(folder / f"pic{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def model(tiny_base, pisa_pkl) -> list[object]:
    return ["--base-model", tiny_base, "--weights", pisa_pkl, "--process-size", "32"]


@pytest.fixture(scope="module")
def reference(mixed, model, tmp_path_factory) -> dict[str, bytes]:
    """The outputs of one process."""
    out = tmp_path_factory.mktemp("reference") / "out"
    done = subprocess.run(
        pisa(mixed, "-o", out, *model, "--device", "cpu", "--quiet"),
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    outputs = visible_bytes(out)
    assert len(outputs) == IMAGES
    return outputs


def check_complete_run(out: Path, report: Path, stderr: str, reference: dict, mixed: Path):
    assert visible_bytes(out) == reference
    assert not temporaries(out)
    summaries = [line for line in stderr.splitlines() if re.match(r"\d+ done, \d+ skipped", line)]
    assert len(summaries) == 2, stderr  # each share sums up its own part
    rows = []
    for index in range(2):
        part = json.loads(report.with_name(f"report.shard{index}of2.json").read_text())
        assert part["summary"]["shard"] == f"{index}/2"
        rows += part["images"]
    assert sorted(row["input"] for row in rows) == sorted(str(p) for p in mixed.iterdir())
    assert {row["status"] for row in rows} == {"done"}
    # each output was written by exactly one rank, and both ranks had work
    manifest = Manifest(out)
    assert len(manifest.files()) == 2
    lines = [json.loads(line) for path in manifest.files() for line in path.open()]
    assert sorted(line["output"] for line in lines) == sorted(reference)
    assert all(path.read_text().strip() for path in manifest.files())


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(mixed, model, reference, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.json"
    command = torchrun(mixed, "-o", out, *model, "--report", report)
    run = subprocess.run(
        command, env=rank_environment(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    check_complete_run(out, report, run.stderr, reference, mixed)


@pytest.mark.slow
@pytest.mark.ray
def test_devices_on_ray_write_what_one_process_writes(mixed, model, reference, tmp_path):
    """The real model loaded in each of two Ray workers, on 6 of the images (RGB, RGBA,
    grey; the fake pipeline runs the whole mixed set on Ray in test_ray)."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pisa-cli[ray])")
    some = tmp_path / "in"
    some.mkdir()
    for source in sorted(mixed.iterdir())[:6]:
        (some / source.name).write_bytes(source.read_bytes())
    out, report = tmp_path / "out", tmp_path / "report.json"
    command = pisa(some, "-o", out, *model, "--report", report, "--devices", "cpu,cpu")
    run = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    written = visible_bytes(out)
    assert written == {name: reference[name] for name in written} and len(written) == 6
    assert not temporaries(out)
    summaries = [line for line in run.stderr.splitlines() if re.match(r"\d+ done, \d+", line)]
    assert summaries == [summaries[0]] and "6 done, 0 skipped" in summaries[0]
    rows = json.loads(report.read_text())["images"]
    assert sorted(row["input"] for row in rows) == sorted(str(p) for p in some.iterdir())
    assert not_ours(run.stdout + run.stderr) == [], run.stderr  # Ray's own lines are off


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def rank_process(launcher: subprocess.Popen, rank: int) -> int | None:
    for pid in descendants(launcher.pid):
        try:
            variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in variables and b"pisa_cli" in arguments:
            return pid
    return None


def kill_rank_one_mid_run(args: list[str], out: Path) -> tuple[subprocess.Popen, str]:
    """Start a run of two ranks; SIGKILL rank 1 once it has recorded an output of its own
    and some output is in place (a record comes just before its rename: on busy cores rank
    1's first record can precede every file)."""
    process = subprocess.Popen(
        args, env=rank_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    rank_manifest = out / ".pisa-manifest.rank1.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        recorded = rank_manifest.is_file() and rank_manifest.read_text().count("\n") >= 1
        if recorded and any(not p.name.startswith(".") for p in out.iterdir()):
            victim = rank_process(process, 1)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
                _, stderr = process.communicate(timeout=120)
                return process, stderr
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"rank 1 wrote nothing in time: {process.communicate()}")


def check_kill_then_rerun(launch, mixed, model, reference, tmp_path):
    out = tmp_path / "out"
    process, _ = kill_rank_one_mid_run(launch(mixed, "-o", out, *model), out)
    assert process.returncode != 0
    partial = visible_bytes(out)
    assert 1 <= len(partial) < IMAGES
    # one process resumes what two shares left: the manifest parts are read together
    again = pisa(mixed, "-o", out, *model, "--device", "cpu")
    check_partial_then_rerun(again, environment(), out, reference)


@pytest.mark.slow
def test_torchrun_rank_killed_then_rerun_completes_the_set(mixed, model, reference, tmp_path):
    check_kill_then_rerun(torchrun, mixed, model, reference, tmp_path)
