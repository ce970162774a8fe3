"""`pisa upscale` as two ranks in real processes, under torchrun (gloo) and with
--devices cpu,cpu: the outputs of one process byte for byte, each image run once, one
report; a rank killed mid-run leaves complete outputs and the rerun finishes the set."""

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
from tests.helpers import check_partial_then_rerun, environment, pisa, temporaries, visible_bytes

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
    assert len(summaries) == 1, stderr  # one summary, rank 0's
    assert f"{IMAGES} done, 0 skipped, 0 failed" in stderr
    payload = json.loads(report.read_text())
    inputs = [row["input"] for row in payload["images"]]
    assert sorted(inputs) == sorted(str(path) for path in mixed.iterdir())  # each once
    assert {row["status"] for row in payload["images"]} == {"done"}
    assert payload["summary"]["ranks"] == 2 and payload["summary"]["lost_ranks"] == []
    # each output was written by exactly one rank, and both ranks had work
    manifest = Manifest(out)
    assert len(manifest.files()) == 2
    lines = [json.loads(line) for path in manifest.files() for line in path.open()]
    assert sorted(line["output"] for line in lines) == sorted(reference)
    assert all(path.read_text().strip() for path in manifest.files())


def accelerate(*args: object) -> list[str]:
    """accelerate's torchrun launcher (--multi_gpu): with no GPU here the ranks take the CPU
    and gloo, as they would under torchrun."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launcher += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launcher += ["--dynamo_backend", "no", "--main_process_port", "0"]
    return [*launcher, "-m", "pisa_cli", "upscale", *map(str, args)]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["torchrun", "devices", "accelerate"])
def test_two_ranks_write_what_one_process_writes(launch, mixed, model, reference, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.json"
    args = (mixed, "-o", out, *model, "--report", report)
    if launch == "accelerate":
        pytest.importorskip("accelerate")  # installed with peft; not a dependency of ours
    command = {
        "torchrun": lambda: torchrun(*args),
        "devices": lambda: pisa(*args, "--devices", "cpu,cpu"),
        "accelerate": lambda: accelerate(*args),
    }[launch]()
    run = subprocess.run(
        command, env=rank_environment(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    if launch == "devices":
        assert "rank 1 of 2 joined" in run.stderr
    check_complete_run(out, report, run.stderr, reference, mixed)


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
    """Start a run of two ranks; SIGKILL rank 1 once it has written an output of its own."""
    process = subprocess.Popen(
        args, env=rank_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    rank_manifest = out / ".pisa-manifest.rank1.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if rank_manifest.is_file() and rank_manifest.read_text().count("\n") >= 1:
            victim = rank_process(process, 1)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
                _, stderr = process.communicate(timeout=120)
                return process, stderr
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"rank 1 wrote nothing in time: {process.communicate()}")


def check_kill_then_rerun(launch, mixed, model, reference, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.json"
    process, stderr = kill_rank_one_mid_run(
        launch(mixed, "-o", out, *model, "--report", report), out
    )
    assert process.returncode != 0
    assert "rank 1 stopped without reporting" in stderr, stderr
    partial = visible_bytes(out)
    assert 1 <= len(partial) < IMAGES
    summary = json.loads(report.read_text())["summary"]
    assert summary["lost_ranks"] == [1] and summary["not_done"] >= IMAGES - len(partial)
    check_partial_then_rerun(launch(mixed, "-o", out, *model), rank_environment(), out, reference)


@pytest.mark.slow
def test_torchrun_rank_killed_then_rerun_completes_the_set(mixed, model, reference, tmp_path):
    check_kill_then_rerun(torchrun, mixed, model, reference, tmp_path)


@pytest.mark.slow
def test_devices_rank_killed_then_rerun_completes_the_set(mixed, model, reference, tmp_path):
    def devices(*args):
        return pisa(*args, "--devices", "cpu,cpu")

    check_kill_then_rerun(devices, mixed, model, reference, tmp_path)
