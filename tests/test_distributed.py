"""Ranks from launcher variables (they become --shard RANK/WORLD_SIZE), --shard's shares,
per-share manifests and reports, the --devices command line, and the one-line errors of a
launch that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from pisa_cli.batch.distributed import (
    RankEnv,
    parse_devices,
    pixel_weights,
    rank_device,
    rank_environment,
)
from pisa_cli.batch.shard import Shard
from pisa_cli.cli import app
from pisa_cli.errors import LaunchError, OptionsError
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


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=12).filter(lambda t: "/" not in t), max_size=40),
    st.integers(min_value=1, max_value=9),
)
def test_every_output_belongs_to_exactly_one_share(names, count):
    root = Path("/out")
    for name in names:
        owners = [k for k in range(count) if Shard(k, count).holds(root / name, root)]
        assert len(owners) == 1  # decided from the name alone: every process agrees


def test_shards_are_even_in_count_over_many_names():
    root = Path("/out")
    counts = [0] * 4
    for index in range(4000):
        counts[next(k for k in range(4) if Shard(k, 4).holds(root / f"p{index}.png", root))] += 1
    assert min(counts) > 900  # 1000 each on average


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3/8", Shard(3, 8)), (" 0/1 ", Shard()), ("8/8", None), ("1/0", None), ("a/2", None)],
)
def test_shard_parse(text, expected):
    if expected is None:
        with pytest.raises(OptionsError, match="--shard"):
            Shard.parse(text)
    else:
        assert Shard.parse(text) == expected
    assert Shard(3, 8).report_path(Path("r/u.json")) == Path("r/u.shard3of8.json")
    assert Shard().report_path(Path("u.csv")) == Path("u.csv")


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


@pytest.mark.parametrize(
    ("args", "environ", "code", "message"),
    [
        (["--devices", "cpu,cpu", "--device", "cpu"], {}, 2, "give one or the other"),
        (["--devices", "gpu"], {}, 1, "is not a device"),
        (["--devices", "0,1"], TORCHRUN | {"RANK": "0"}, 1, "run it once, not under torchrun"),
        (["--devices", "cpu,cpu", "--shard", "0/2"], {}, 2, "give one or the other"),
        (["--shard", "2/2"], {}, 2, "0 <= K < N"),
    ],
)
def test_launch_errors_from_the_command(tmp_path, monkeypatch, args, environ, code, message):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["upscale", str(tmp_path), "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output


def _folder(tmp_path: Path, count: int = 10) -> Path:
    from tests.builders import noise_image

    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(count):
        noise_image(8 + index, 6, index).save(folder / f"p{index}.png")
    return folder


@pytest.fixture
def models(tiny_base, pisa_pkl):
    from tests.helpers import model_args

    return [*model_args(tiny_base, pisa_pkl), "--process-size", "32"]


def test_shards_together_write_what_one_process_writes(tmp_path, monkeypatch, models):
    import json

    from tests.fakes import run_fake
    from tests.helpers import visible_bytes

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    folder = _folder(tmp_path)
    whole = run_fake("upscale", folder, "-o", tmp_path / "whole", *models)
    assert whole.exit_code == 0, whole.output
    out, report = tmp_path / "out", tmp_path / "r.json"
    done = []
    for index in range(3):
        args = (folder, "-o", out, *models, "--report", report, "--shard", f"{index}/3")
        result = run_fake("upscale", *args)
        assert result.exit_code == 0, result.output
        part = json.loads((tmp_path / f"r.shard{index}of3.json").read_text())
        assert part["summary"]["shard"] == f"{index}/3"
        done += [row["input"] for row in part["images"] if row["status"] == "done"]
    assert not report.exists()
    assert sorted(done) == sorted(str(path) for path in folder.iterdir())  # each once
    assert visible_bytes(out) == visible_bytes(tmp_path / "whole")
    assert [p.name for p in Manifest(out).files()] == [manifest_name(k) for k in range(3)]
    parts = [tmp_path / f"r.shard{index}of3.json" for index in range(3)]
    merged = run_fake("merge-reports", *parts, "-o", report)
    assert merged.exit_code == 0 and "10 done, 0 skipped, 0 failed in 3 parts" in merged.output
    payload = json.loads(report.read_text())
    assert payload["summary"]["shards"] == ["0/3", "1/3", "2/3"]
    assert sorted(row["input"] for row in payload["images"]) == sorted(done)
    (tmp_path / "r.shard1of3.json").write_text("{}")
    bad = run_fake("merge-reports", *parts, "-o", tmp_path / "m.csv")
    assert bad.exit_code == 2 and "r.shard1of3.json: not a JSON report of pisa" in bad.output
    again = run_fake("upscale", folder, "-o", out, *models)  # any process resumes
    assert "10 outputs up to date" in again.output and "0 done, 10 skipped" in again.output


def test_a_launcher_rank_runs_its_share_on_its_own(tmp_path, monkeypatch, models):
    from tests.fakes import run_fake

    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)  # rank 3 of 4; no MASTER_PORT: nothing to join
    folder, out = _folder(tmp_path), tmp_path / "out"
    result = run_fake("upscale", folder, "-o", out, *models)
    assert result.exit_code == 0, result.output
    mine = [path for path in folder.iterdir() if Shard(3, 4).holds(out / path.name, out)]
    assert f"{len(mine)} done, 0 skipped, 0 failed" in result.output
    assert [path.name for path in Manifest(out).files()] == [manifest_name(3)]
