"""--ray and --devices on Ray Data: the worker class called directly on batch dicts (no Ray),
then a few runs on a real local Ray instance (marked ``ray``, skipped without the extra): a
mixed folder byte for byte as one process writes it, resume, a worker killed mid-run, a
poison image that kills its worker every time."""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

from pisa_cli.batch.ray_worker import (
    ATTEMPTS,
    Ledger,
    UpscaleWorker,
    job_rows,
    result_from_json,
)
from pisa_cli.errors import WeightsError
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.manifest import Manifest
from pisa_cli.options import BatchOptions, ModelOptions, UpscaleOptions
from tests.builders import noise_image, save_hard_cases
from tests.fakes import FakePipeline, run_on
from tests.helpers import not_ours, visible_bytes

OPTIONS = UpscaleOptions(scale=2)


def _worker(tmp_path: Path, pipeline=None, ledger=None, load=None) -> UpscaleWorker:
    pipeline = pipeline or FakePipeline()
    load = load or (lambda model, options: pipeline)
    return UpscaleWorker(
        ModelOptions(device="cpu"), OPTIONS, BatchOptions(), {"a": 1}, str(tmp_path / "out"),
        load, ledger,
    )  # fmt: skip


def _batch(jobs: list[Job]) -> dict:
    rows = job_rows(jobs)
    return {name: [row[name] for row in rows] for name in ("index", "source", "output")}


def _jobs(tmp_path: Path, count: int = 3) -> list[Job]:
    (tmp_path / "out").mkdir(exist_ok=True)
    jobs = []
    for index in range(count):
        source = tmp_path / f"p{index}.png"
        noise_image(6 + index, 5, index).save(source)
        jobs.append(Job(source, tmp_path / "out" / f"p{index}.png"))
    return jobs


def test_the_worker_upscales_a_batch_and_returns_small_result_rows(tmp_path):
    jobs = _jobs(tmp_path)
    (tmp_path / "p1.png").write_bytes(b"not a png")  # one bad image fails alone
    returned = _worker(tmp_path)(_batch(jobs))
    assert returned["index"] == [0, 1, 2]
    results = [
        result_from_json(job, text)[0] for job, text in zip(jobs, returned["result"], strict=True)
    ]
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert "p1.png" in results[1].error
    assert Image.open(jobs[0].output).size == (12, 10)
    assert all(len(text) < 2000 for text in returned["result"])  # results, never pixels
    (part,) = Manifest(tmp_path / "out").files()  # a manifest part of its own
    assert part.name.startswith(".pisa-manifest.rank")


def test_a_retry_reuses_finished_results_and_fails_an_image_that_killed_its_worker(tmp_path):
    jobs = _jobs(tmp_path)
    ledger = Ledger()
    ledger.finished(0, _worker(tmp_path)(_batch(jobs[:1]))["result"][0])
    for _ in range(ATTEMPTS):
        ledger.started(1)  # in the model twice when its worker died
    ledger.started(2)  # once, beside it
    pipeline = FakePipeline()
    returned = _worker(tmp_path, pipeline, ledger)(_batch(jobs))
    results = [
        result_from_json(job, text)[0] for job, text in zip(jobs, returned["result"], strict=True)
    ]
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert f"its worker died {ATTEMPTS} times" in results[1].error
    assert pipeline.calls == 1  # only image 2 ran: 0 was known, 1 is not tried again
    assert max(pipeline.batches, default=1) == 1  # after a death, one at a time
    assert ledger.starts == {1: ATTEMPTS, 2: 2}
    ledger.forget([0, 1, 2])  # once the driver has them
    assert ledger.state([0, 1, 2]) == ([0, 0, 0], [None, None, None])


def test_a_worker_whose_model_fails_to_load_stops_the_run_with_its_code(tmp_path):
    def load(model, options):
        raise WeightsError("weights.pkl: not a checkpoint")

    jobs = _jobs(tmp_path, 1)
    text = _worker(tmp_path, load=load)(_batch(jobs))["result"][0]
    result, code = result_from_json(jobs[0], text)
    assert code == WeightsError.exit_code and "weights.pkl" in result.error


def test_no_result_for_the_timeout_fails_the_rest_with_one_line_each(tmp_path, monkeypatch):
    import threading

    from pisa_cli.batch import ray_run
    from pisa_cli.batch.ray_run import _results

    monkeypatch.setattr(ray_run, "FORGET_EVERY", 1)
    forgotten: list = []

    class Stuck:
        def iter_rows(self):
            yield {"index": 0, "result": _worker(tmp_path)(_batch(jobs[:1]))["result"][0]}
            threading.Event().wait(30)  # a cluster that stopped answering
            yield {}

    jobs = _jobs(tmp_path)
    results = list(_results(Stuck(), jobs, threading.Event(), 1.0, forgotten.append))
    assert forgotten == [[0]]  # the ledger lets go of what the driver has
    assert [r.status for r in results] == ["done", "failed", "failed"]
    assert "not run: no result from Ray in 1 s (PISA_RAY_TIMEOUT)" in results[2].error


def test_ctrl_c_stops_taking_results_and_the_rest_is_not_done(tmp_path):
    import threading

    from pisa_cli.batch.ray_run import _results
    from pisa_cli.batch.run import Outcome, collect

    jobs = _jobs(tmp_path)
    text = _worker(tmp_path)(_batch(jobs[:1]))["result"][0]

    class Interrupted:
        def iter_rows(self):
            yield {"index": 0, "result": text}
            threading.Event().wait(30)
            yield {}

    class Display:
        def finished(self, result):
            raise KeyboardInterrupt  # Ctrl-C while showing the first result

    stop, outcome = threading.Event(), Outcome()
    results = _results(Interrupted(), jobs, stop, timeout=60.0)
    collect(results, {}, outcome, len(jobs), display=Display(), stop=stop)
    assert outcome.interrupted and outcome.not_done == 3 and outcome.results == []


def test_no_cluster_at_the_address_is_one_line():
    from pisa_cli.batch.ray_run import RayTarget, connect
    from pisa_cli.errors import LaunchError

    class NoCluster:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            raise ConnectionError("Could not find any running Ray instance.\nPlease ...")

    with pytest.raises(LaunchError) as error:
        connect(NoCluster(), RayTarget("auto"))
    assert str(error.value).startswith("--ray auto: cannot join the Ray cluster (Could not find")
    assert "\n" not in str(error.value)


def test_a_ray_that_cannot_start_leaves_no_output_folder(tmp_path, monkeypatch, weights):
    from pisa_cli.batch import ray_run

    class NoCluster:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray_run, "import_ray", NoCluster)
    noise_image(8, 8).save(tmp_path / "a.png")
    out = tmp_path / "new" / "out"
    result = run_on(None, "upscale", tmp_path / "a.png", "-o", out, *weights, "--ray", "auto")
    assert result.exit_code == 1 and "cannot join the Ray cluster" in result.output
    assert not (tmp_path / "new").exists()


def test_the_largest_images_go_first(tmp_path):
    from pisa_cli.batch.ray_run import largest_first

    jobs = _jobs(tmp_path)  # 6x5, 7x5, 8x5
    (tmp_path / "p0.png").write_bytes(b"not an image")  # weighs 1: last
    assert largest_first(jobs, BatchOptions()) == [2, 1, 0]
    assert [row["index"] for row in job_rows(jobs, [2, 1, 0])] == [2, 1, 0]


def test_a_failed_dataset_fails_what_did_not_come_back(tmp_path):
    import threading

    from pisa_cli.batch.ray_run import _results

    class Broken:
        def iter_rows(self):
            raise RuntimeError("ActorDiedError: the actor died unexpectedly\ntraceback ...")
            yield

    jobs = _jobs(tmp_path, 2)
    results = list(_results(Broken(), jobs, threading.Event(), timeout=5.0))
    assert [r.error.split(": ", 1)[1] for r in results] == [
        "not run: Ray stopped: ActorDiedError: the actor died unexpectedly"
    ] * 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ray", "photos"], "expected local, auto or a cluster address"),
        (["--ray", "local", "--shard", "0/2"], "give one or the other"),
        (["--devices", "cpu,cpu", "--ray", "auto"], "leave out --ray"),
    ],
)
def test_ray_option_errors(tmp_path, args, message):
    noise_image(8, 8).save(tmp_path / "a.png")
    result = run_on(None, "upscale", tmp_path / "a.png", "-o", tmp_path / "o", *args)
    assert result.exit_code == 2 and message in result.output


def test_without_ray_the_option_says_how_to_install_it(tmp_path, monkeypatch, tiny_base, pisa_pkl):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    noise_image(8, 8).save(tmp_path / "a.png")
    model = ["--base-model", tiny_base, "--weights", pisa_pkl, "--device", "cpu"]
    args = ["upscale", tmp_path / "a.png", "-o", tmp_path / "o", *model[:4], "--ray", "local"]
    result = run_on(None, *args)
    assert result.exit_code == 1
    assert "pip install 'pisa-cli[ray]'" in result.output


# --- on a real local Ray instance -------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for this module's tests (stopped after them, so that it does
    not idle beside the instances other modules start): 2 CPUs, no GPU, 256 MiB of object store, no
    dashboard, quiet; a run with no result for 60 s stops (PISA_RAY_TIMEOUT), so a stuck
    Ray fails a test instead of hanging the suite."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pisa-cli[ray])")
    saved = dict(os.environ)
    root = str(Path(__file__).parents[1])
    # the workers import pisa_cli and tests.fakes from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(
        part for part in (root, os.environ.get("PYTHONPATH", "")) if part
    )
    # workers at nice 0, as connect starts them (at Ray's 15 they starve beside busy cores)
    os.environ.update(PISA_RAY_TIMEOUT="60", RAY_BACKEND_LOG_LEVEL="fatal", RAY_worker_niceness="0")
    ray.init(
        num_cpus=2, num_gpus=0, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
        log_to_driver=False, logging_level="ERROR",
    )  # fmt: skip
    yield ray
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


class DyingPipeline(FakePipeline):
    """Kills its worker process (os._exit) on 13x9 images: every time, or only the first
    time when ``once`` names a marker file."""

    def __init__(self, once: str = ""):
        super().__init__()
        self.once = once

    def upscale_with_info(self, image, options):
        size = getattr(image, "size", None)
        if size == (13, 9) and not (self.once and os.path.exists(self.once)):
            if self.once:
                Path(self.once).touch()
            os._exit(1)
        return super().upscale_with_info(image, options)


@pytest.fixture
def mixed(tmp_path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index in range(6):
        noise_image(8 + index, 6, index).save(folder / f"p{index}.png")
    save_hard_cases(folder)
    noise_image(13, 9, 10).save(folder / "victim.png")  # 13x9: DyingPipeline's
    return folder


@pytest.fixture
def weights(tiny_base, pisa_pkl) -> list:
    return ["--base-model", tiny_base, "--weights", pisa_pkl]


def _run(pipeline, mixed: Path, out: Path, weights: list, *extra):
    args = ["upscale", mixed, "-o", out, "--scale", "2", "--process-size", "16"]
    args += ["--max-pixels", "3000", *extra]
    return run_on(pipeline, *args, *weights)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_writes_what_one_process_writes_and_resumes(ray_instance, mixed, tmp_path, weights):
    single_report = tmp_path / "single.json"
    single = _run(FakePipeline(), mixed, tmp_path / "single", weights, "--report", single_report)
    assert single.exit_code == 1, single.output  # the corrupt and the huge image fail
    report = tmp_path / "r.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_ray = _run(
            FakePipeline(), mixed, tmp_path / "ray", weights, "--ray", "local", "--report", report
        )
    assert on_ray.exit_code == 1, on_ray.output
    # Ray 2.60 warns where a deprecated form is called (concurrency=, ray_remote_args...)
    assert [str(w.message) for w in caught if "pisa_cli" in w.filename] == []
    assert visible_bytes(tmp_path / "ray") == visible_bytes(tmp_path / "single")
    counts = re.search(r"(\d+) done, 0 skipped, (\d+) failed", single.output)
    # the corrupt and the huge image fail, and the 16-bit one (the fake takes 8 bits only)
    assert counts and counts.groups() == ("9", "3"), single.output
    assert counts[0] in on_ray.output  # the same summary
    rows = json.loads(report.read_text())["images"]
    expected = json.loads(single_report.read_text())["images"]
    assert [r["input"] for r in rows] == [r["input"] for r in expected]  # each once, in order
    assert [r["status"] for r in rows] == [r["status"] for r in expected]
    devices = _run(FakePipeline(), mixed, tmp_path / "devices", weights, "--devices", "cpu,cpu")
    assert visible_bytes(tmp_path / "devices") == visible_bytes(tmp_path / "single")
    assert counts[0] in devices.output
    again = _run(None, mixed, tmp_path / "ray", weights, "--ray", "local")  # nothing left: no model
    assert f"0 done, {counts[1]} skipped, {counts[2]} failed" in again.output, again.output


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_costs_a_rerun_and_a_poison_image_fails_alone(
    ray_instance, mixed, tmp_path, weights
):
    for name in ("corrupt.png", "huge.png", "deep16.png"):  # failures of their own
        (mixed / name).unlink()
    once = _run(
        DyingPipeline(str(tmp_path / "died")), mixed, tmp_path / "once", weights, "--ray", "local"
    )
    assert once.exit_code == 0, once.output  # killed once: its images ran again elsewhere
    assert (tmp_path / "died").exists() and "9 done, 0 skipped, 0 failed" in once.output
    assert not_ours(once.output) == []  # no "(raylet) A worker died ..." in our display
    poison = _run(DyingPipeline(), mixed, tmp_path / "poison", weights, "--ray", "local")
    assert poison.exit_code == 1, poison.output
    assert "8 done, 0 skipped, 1 failed" in poison.output
    assert f"victim.png: its worker died {ATTEMPTS} times" in poison.output
    assert not_ours(poison.output) == []


class NodeRecorder(FakePipeline):
    """Writes, for each image, the id of the Ray node that upscaled it into ``folder``;
    takes 0.2 s an image, as a model would (a worker that starts late still gets work)."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def upscale_with_info(self, image, options):
        import ray

        time.sleep(0.2)
        node = ray.get_runtime_context().get_node_id()
        Path(self.folder, f"{image.size[0]}x{image.size[1]}-{os.getpid()}").write_text(node)
        return super().upscale_with_info(image, options)


TWO_NODES = """
import sys
from pathlib import Path
from ray.cluster_utils import Cluster
from tests.fakes import run_on
from tests.test_ray import NodeRecorder
folder, out, nodes, *weights = sys.argv[1:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
try:
    result = run_on(NodeRecorder(nodes), "upscale", folder, "-o", out, "--ray", cluster.address,
                    "--scale", "2", *weights)
    print(result.output)
    sys.exit(result.exit_code)
finally:
    cluster.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_two_ray_nodes_on_this_machine_share_the_work(tmp_path, weights):
    """Two nodes of 2 CPUs each: three workers (one CPU is left to Ray), so both nodes hold
    at least one; the images land on both, each once."""
    import subprocess
    import sys

    pytest.importorskip("ray", reason="the ray extra is not installed (pisa-cli[ray])")
    folder, out, nodes = tmp_path / "in", tmp_path / "out", tmp_path / "nodes"
    folder.mkdir()
    nodes.mkdir()
    for index in range(48):
        noise_image(8 + index, 6, index).save(folder / f"p{index:02d}.png")
    root = str(Path(__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=root, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    args = [sys.executable, "-c", TWO_NODES, folder, out, nodes, *map(str, weights)]
    done = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "48 done, 0 skipped, 0 failed" in done.stdout
    assert not_ours(done.stdout) == [], done.stdout  # Ray's lines off (the cluster's aside)
    seen = {path.read_text() for path in nodes.iterdir()}
    assert len(seen) == 2, seen  # both nodes worked
    assert len(list(out.glob("*.png"))) == 48
