"""Ranks from launcher variables, pixel-balanced shares, per-rank manifests, the --devices
command line, and the one-line errors of a launch that cannot work."""

from __future__ import annotations

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from pisa_cli.batch.distributed import (
    RankEnv,
    RankProgress,
    join,
    parse_devices,
    pixel_weights,
    rank_device,
    rank_environment,
    rank_timeout,
    shard_by_weight,
)
from pisa_cli.cli import app
from pisa_cli.cli.progress import ranks_line
from pisa_cli.errors import LaunchError
from pisa_cli.imaging.manifest import MANIFEST_NAME, Manifest, manifest_name

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0"}
SRUN = {
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_LOCALID": "1",
}


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, RankEnv()),
        (TORCHRUN, RankEnv(3, 4, 1, "torchrun")),
        # accelerate launch runs torchrun's launcher: the same three variables
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "ACCELERATE_MIXED_PRECISION": "no"},
            RankEnv(1, 2, 1, "torchrun"),
        ),
        (SRUN, RankEnv(5, 8, 1, "slurm")),
        ({**SRUN, "SLURM_STEP_NUM_TASKS": "", "SLURM_NTASKS": "8"}, None),
        # torchrun started by srun on each node: torchrun's ranks win
        ({**SRUN, **TORCHRUN}, RankEnv(3, 4, 1, "torchrun")),
        # an sbatch script has SLURM_PROCID=0 and the job's task count, but is one process
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}, RankEnv()),
        ({"RANK": "0", "WORLD_SIZE": "1"}, RankEnv(0, 1, 0, "torchrun")),
    ],
)
def test_rank_environment(environ, expected):
    if expected is None:  # an empty step task count is a launcher bug: said, not guessed
        with pytest.raises(LaunchError, match="SLURM_STEP_NUM_TASKS"):
            rank_environment(environ)
        return
    env = rank_environment(environ)
    assert env == expected
    assert env.distributed == (expected.world_size > 1)


def test_srun_without_a_step_task_count_uses_the_job_count():
    environ = {"SLURM_STEPID": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert rank_environment(environ) == RankEnv(1, 2, 0, "slurm")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one': expected a whole number"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 of 2"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "rank 0 of 0"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "local rank -1"),
    ],
)
def test_bad_rank_variables_are_one_clear_error(environ, message):
    with pytest.raises(LaunchError, match=message):
        rank_environment(environ)


def test_rank_timeout():
    assert rank_timeout({}) == 300
    assert rank_timeout({"PISA_RANK_TIMEOUT": "12.5"}) == 12.5
    for bad in ("0", "-3", "soon"):
        with pytest.raises(LaunchError, match="PISA_RANK_TIMEOUT"):
            rank_timeout({"PISA_RANK_TIMEOUT": bad})


@pytest.mark.parametrize(
    ("requested", "gpus", "expected"),
    [
        ("auto", 4, "cuda:1"),
        ("cuda", 4, "cuda:1"),
        ("auto", 1, "cuda:0"),  # srun --gpus-per-task=1, Kubernetes: each rank sees its own
        ("cuda", 1, "cuda:0"),
        ("auto", 0, "cpu"),
        ("cuda", 0, "cuda"),  # no GPU: the loader says so
        ("cpu", 4, "cpu"),
        ("cuda:0", 4, "cuda:0"),  # an explicit device is the user's choice
    ],
)
def test_rank_device_takes_the_local_rank_gpu(requested, gpus, expected):
    assert rank_device(requested, RankEnv(3, 4, 1, "torchrun"), gpus) == expected


def test_parse_devices():
    assert parse_devices("0,1,2,3") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    assert parse_devices("cuda:2,3") == ["cuda:2", "cuda:3"]
    for bad in ("gpu0", "0,,1", "cuda:x"):
        with pytest.raises(LaunchError, match="--devices"):
            parse_devices(bad)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=10_000_000), max_size=60),
    st.integers(min_value=1, max_value=9),
)
def test_shards_hold_every_item_once_balanced_by_weight(weights, parts):
    shares = shard_by_weight(weights, parts)
    assert len(shares) == parts
    assert sorted(i for share in shares for i in share) == list(range(len(weights)))
    assert all(share == sorted(share) for share in shares)  # each rank keeps input order
    assert shard_by_weight(list(weights), parts) == shares  # every rank computes the same
    loads = [sum(weights[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(weights, default=0)


def test_shards_balance_pixels_not_file_counts():
    # one 4-megapixel image weighs as much as the sixteen quarter-megapixel ones together
    weights = [4_000_000] + [250_000] * 16
    shares = shard_by_weight(weights, 2)
    assert shares[0] == [0] and shares[1] == list(range(1, 17))


def test_pixel_weights_read_headers(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    Image.new("L", (7, 9)).save(tmp_path / "b.jpg")
    (tmp_path / "c.png").write_bytes(b"not an image")
    names = ["a.png", "b.jpg", "c.png", "missing.png"]
    assert pixel_weights([tmp_path / name for name in names]) == [1200, 63, 1, 1]


def test_each_rank_appends_to_its_own_manifest_read_together(tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (4, 4)).save(source)
    outputs = {rank: tmp_path / f"out{rank}.png" for rank in (0, 1, 2)}
    for rank, output in outputs.items():
        manifest = Manifest(tmp_path, {"a": 1}, rank=rank)
        Image.new("RGB", (16, 16)).save(output)
        manifest.record(source, output, output)
    assert (tmp_path / MANIFEST_NAME).is_file()
    assert (tmp_path / manifest_name(2)).name == ".pisa-manifest.rank2.jsonl"
    merged = Manifest(tmp_path, {"a": 1})
    assert [p.name for p in merged.files()] == [manifest_name(r) for r in (0, 1, 2)]
    for output in outputs.values():
        assert merged.decide(source, output).reason == "up to date"
    # a line cut by a killed rank spoils nothing but that line
    with open(tmp_path / manifest_name(1), "a") as handle:
        handle.write('{"output": "out9.png", "sett')
    again = Manifest(tmp_path, {"a": 1})
    assert again.unreadable_lines == 1
    assert all(again.decide(source, o).reason == "up to date" for o in outputs.values())


def test_ranks_line_adds_up_the_ranks():
    progress = [RankProgress(0, 6, 10, 3.0), RankProgress(1, 2, 10, 2.0)]
    line = ranks_line(progress)
    assert "8/20 done" in line and "3.00 img/s" in line
    assert "rank 0 2.00, rank 1 1.00 img/s" in line
    assert "4 s left" in line  # 12 images at 3 per second


def test_worker_arguments_rebuild_the_command_without_devices():
    from pisa_cli.cli.launch import worker_arguments

    command = typer.main.get_command(app).commands["upscale"]  # type: ignore[attr-defined]
    given_args = ["a.png", "-o", "out", "--devices", "cpu,cpu", "--scale", "2", "--quiet"]
    given_args += ["--lambda-sem", "0.5", "--report", "r.json", "--recursive", "--", "-dir"]
    context = command.make_context("upscale", given_args)
    rebuilt = worker_arguments(context)
    assert "--devices" not in rebuilt and "--device" not in rebuilt
    again = command.make_context("upscale", rebuilt).params
    for name, value in context.params.items():
        if name not in ("devices", "device"):
            assert again[name] == value, name


def test_join_without_a_rendezvous_address_is_one_line(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT not set") as error:
        join(RankEnv(1, 2, 1, "slurm"), "cpu", timeout=1)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_join_fails_cleanly_when_the_other_ranks_never_come(monkeypatch):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with pytest.raises(LaunchError, match="cannot set up the process group") as error:
        join(RankEnv(1, 2, 0, "torchrun"), "cpu", timeout=2)  # rank 0 never starts its store
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("args", "environ", "code", "message"),
    [
        (["--devices", "cpu,cpu", "--device", "cpu"], {}, 2, "give one or the other"),
        (["--devices", "gpu"], {}, 1, "is not a device"),
        (["--devices", "0,1"], TORCHRUN | {"RANK": "0"}, 1, "leave it out under torchrun"),
        ([], {"RANK": "0", "WORLD_SIZE": "2"}, 1, "MASTER_ADDR and MASTER_PORT not set"),
    ],
)
def test_launch_errors_from_the_command(tmp_path, monkeypatch, args, environ, code, message):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    if "MASTER_ADDR" in environ and args == []:
        monkeypatch.delenv("MASTER_ADDR")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["upscale", str(tmp_path), "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
