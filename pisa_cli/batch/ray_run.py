"""`--ray` and `--devices`: the batch on Ray Data, with our display, summary and report.

The driver (this process) plans as one process does (lists the inputs, skips what is up
to date, screens headers), orders the jobs by header pixel count, largest first, and makes
a dataset of job rows (``ray_worker.job_rows``: paths,
never pixels). ``map_batches`` runs ``UpscaleWorker`` on an actor pool (one actor per GPU,
``num_gpus=1``; on CPUs, one per CPU but one), each loading the pipeline once and writing
its own outputs; the result rows stream back into ``run.collect`` like one process's.
Ray's progress bars and log lines are off; actor restarts and task retries are capped
(Ray's defaults are infinite: a poison image would loop), and a run without a result for
PISA_RAY_TIMEOUT seconds (default 600) stops with the rest failed. ``ray.data.read_images``
/ ``write_images`` are not used: they drop modes, clip 16 bits, abort on a corrupt file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pisa_cli.batch.display import Display
from pisa_cli.batch.distributed import pixel_weights
from pisa_cli.batch.ray_worker import ATTEMPTS, Ledger, UpscaleWorker, job_rows, result_from_json
from pisa_cli.batch.run import Outcome, PipelineFactory, StreamSpec, collect
from pisa_cli.batch.runner import FAILED, JobResult
from pisa_cli.errors import LaunchError, PisaError
from pisa_cli.imaging.discover import Job
from pisa_cli.options import BatchOptions, ModelOptions

INSTALL = "--ray and --devices run on Ray Data: pip install 'pisa-cli[ray]'"
ROWS_PER_CALL = 8
"""Job rows per ``map_batches`` call: room for image batches, small enough to balance."""
RETRIES = ATTEMPTS * ROWS_PER_CALL + 1
"""Task retries and actor restarts allowed: every death charges an image of the call."""
TIMEOUT_ENV = "PISA_RAY_TIMEOUT"
DEFAULT_TIMEOUT = 600.0

log = logging.getLogger(__name__)


class RunStopped(PisaError):
    """The workers' model did not load: the run stops with its line and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class RayTarget:
    """Where the run goes: ``local`` (an instance on this machine), ``auto`` (RAY_ADDRESS,
    ``ray job submit``) or a cluster's address; ``devices`` (--devices) limits a local one."""

    address: str = "local"
    devices: tuple[str, ...] = ()


def import_ray():
    """Ray, or LaunchError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise LaunchError(INSTALL) from None
    return ray


def no_progress_timeout(environ=None) -> float:
    environ = os.environ if environ is None else environ
    text = environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if value <= 0:
        raise LaunchError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds above 0")
    return value


def quiet_ray() -> None:
    """Ray's own lines off, so that only ours are printed: its Python loggers to errors,
    and the driver's error listener, which prints every cluster event ("(raylet) A worker
    died or was killed ...") on stdout in the middle of our display even with
    ``log_to_driver=False``, sends the raylet's lines to our debug log (``-v`` shows them;
    our results already say what a death cost). Ray 2.60 has no switch for the listener:
    its module function is wrapped, once, and a Ray without it is left as it is."""
    for name in ("ray", "ray.data"):  # our display says what happens, not Ray's
        logging.getLogger(name).setLevel(logging.ERROR)
    worker = sys.modules.get("ray._private.worker")
    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "quieted", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            for line in data.get("lines", ()):
                log.debug("ray: %s", line)
            return
        printer(data, ignore_prefix)

    print_to_stdstream.quieted = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream


@contextlib.contextmanager
def _stderr_to_debug_log() -> Iterator[None]:
    """File descriptor 2 into a temporary file while Ray starts, its lines then sent to our
    debug log: Ray's C++ core writes there directly (``logging.cc: Set ray log level from
    environment variable ...`` whenever RAY_BACKEND_LOG_LEVEL is set)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (an embedded interpreter)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                log.debug("ray: %s", line)


def connect(ray, target: RayTarget) -> bool:
    """Start or join Ray, quietly; whether we started it (and shut it down at the end). A
    Ray already running in this process (a test's, a notebook's) is used as it is."""
    quiet_ray()
    if ray.is_initialized():
        return False
    with _stderr_to_debug_log():
        return _init(ray, target)


def _init(ray, target: RayTarget) -> bool:
    # Ray's C++ core warns on stderr for every actor whose constructor arguments are in
    # the object store (map_batches puts them there) and may restart: that is our design
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    quiet: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    if target.address != "local":
        try:
            ray.init(address=target.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise LaunchError(
                f"--ray {target.address}: cannot join the Ray cluster ({_first_line(error)}); "
                "start one with `ray start --head`, set RAY_ADDRESS, or use --ray local"
            ) from None
        return True
    # address="local": a new instance of our own even where `ray start` left one running
    # (which ray.init would otherwise join, and refuse num_cpus/num_gpus for). Its workers
    # at nice 0, not Ray's 15: they are the job, and beside any busy process niced workers
    # starve (6 images took 297 s beside two busy loops on two cores, 25 s at nice 0)
    os.environ.setdefault("RAY_worker_niceness", "0")
    gpus = [device.removeprefix("cuda:") for device in target.devices if device != "cpu"]
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        ray.init(address="local", num_gpus=len(gpus), **quiet)
    elif target.devices:  # cpu,cpu: one worker each, a CPU left for Ray's own tasks
        ray.init(address="local", num_cpus=len(target.devices) + 1, num_gpus=0, **quiet)
    else:
        ray.init(address="local", **quiet)
    return True


def pool_size(ray, target: RayTarget) -> tuple[int, int]:
    """(actors, GPUs per actor): one per GPU of the cluster; without GPUs one per CPU but
    one (left to Ray's own tasks: with every CPU reserved by actors the run hangs)."""
    resources = ray.cluster_resources()
    spare_cpus = max(1, int(resources.get("CPU", 1)) - 1)
    if target.devices and all(device == "cpu" for device in target.devices):
        return min(len(target.devices), spare_cpus), 0
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, 1
    return spare_cpus, 0


def run_on_ray(
    spec: StreamSpec,
    model: ModelOptions,
    load: PipelineFactory,
    target: RayTarget,
    outcome: Outcome,
    *,
    display: Display,
    stop: threading.Event,
) -> None:
    """Run ``spec`` (as ``run.stream`` does, its manifest naming the output folder and the
    settings each worker records) on Ray with ``model``'s pipeline into ``outcome``, each
    result shown as it comes back. Raises LaunchError (no Ray, no cluster) or the workers'
    model error (RunStopped, with its exit code)."""
    if spec.manifest is None:
        raise ValueError("a run on Ray records its outputs: the StreamSpec needs its manifest")
    ray = import_ray()
    timeout = no_progress_timeout()
    started = connect(ray, target)
    jobs = spec.jobs
    try:
        rows, ledger = _dataset(ray, spec, model, load, target)
        results = _results(rows, jobs, stop, timeout, ledger.forget.remote)
        begun, first = time.perf_counter(), len(outcome.results)  # the models' loading in
        collect(results, spec.reasons, outcome, len(jobs), display=display, stop=stop)
        outcome.run_seconds = time.perf_counter() - begun
        place = {job: index for index, job in enumerate(jobs)}  # the report: input order
        outcome.results[first:] = sorted(outcome.results[first:], key=lambda r: place[r.job])
    finally:
        if started:
            ray.shutdown()


def _dataset(ray, spec: StreamSpec, model: ModelOptions, load: PipelineFactory, target: RayTarget):
    jobs, options, batch, manifest = spec.jobs, spec.options, spec.batch, spec.manifest
    settings, output = manifest.settings, manifest.root  # type: ignore[union-attr]
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    size, gpus = pool_size(ray, target)
    model = replace(model, device="cuda" if gpus else "cpu")
    ledger = ray.remote(num_cpus=0)(Ledger).remote()
    arguments = dict(
        model=model, options=options, batch=batch, settings=settings, output=str(output),
        load=load, ledger=ledger,
    )  # fmt: skip
    blocks = max(1, min(len(jobs), size * 4))
    dataset = ray.data.from_items(
        job_rows(jobs, largest_first(jobs, batch)), override_num_blocks=blocks
    )
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for the two caps (max_restarts, max_task_retries)
        # nor for scheduling_strategy: they can only go through ray_remote_args, which it
        # says is deprecated and removed in 2.64 (the extra's pin keeps this working;
        # revisit when raising it). compute=ActorPoolStrategy is its non-deprecated form
        # (concurrency= is the deprecated one).
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        return _map(dataset, arguments, ray, size, gpus), ledger


def _map(dataset, arguments: dict, ray, size: int, gpus: int):
    return dataset.map_batches(
        UpscaleWorker,
        fn_constructor_kwargs=arguments,
        batch_size=ROWS_PER_CALL,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size),  # every GPU from the start
        num_cpus=1,
        num_gpus=gpus,
        max_restarts=RETRIES,
        max_task_retries=RETRIES,
        scheduling_strategy="SPREAD",  # over the nodes, not packed onto the first
    )


def largest_first(jobs: Sequence[Job], batch: BatchOptions) -> list[int]:
    """Job indices by pixel count (from the headers), largest first: the long images start
    early and small ones fill the end, and images of one size sit together for batching."""
    weights = pixel_weights([job.source for job in jobs], batch.max_pixels)
    return sorted(range(len(jobs)), key=lambda index: (-weights[index], index))


FORGET_EVERY = 256
"""Results taken before the ledger is told to let go of them (it holds only what a retry
may still need, not the whole run)."""


def _results(
    dataset,
    jobs: Sequence[Job],
    stop: threading.Event,
    timeout: float,
    forget: Callable[[list[int]], object] = lambda indices: None,
):
    """The results as they come back; when Ray fails, stops for ``timeout`` seconds, or
    ``stop`` is set, what is left: failed with the line (Ray) or not done (stopped).
    ``forget(indices)`` is called (without waiting) for results taken."""
    arrived: queue.Queue = queue.Queue(maxsize=64)
    done = object()

    def produce() -> None:
        try:
            for row in dataset.iter_rows():
                arrived.put(row)
        except Exception as error:  # the dataset failed: the rest is failed below
            arrived.put(error)
        arrived.put(done)

    threading.Thread(target=produce, name="pisa-ray", daemon=True).start()
    seen: set[int] = set()
    taken: list[int] = []
    waited = 0.0
    why = ""
    while not stop.is_set():
        try:
            item = arrived.get(timeout=0.5)
        except queue.Empty:
            waited += 0.5
            if waited >= timeout:
                why = f"no result from Ray in {timeout:.0f} s ({TIMEOUT_ENV})"
                break
            continue
        waited = 0.0
        if item is done:
            break
        if isinstance(item, Exception):
            why = f"Ray stopped: {_first_line(item)}"
            break
        index = int(item["index"])
        result, load_error = result_from_json(jobs[index], str(item["result"]))
        if load_error:
            raise RunStopped(result.error, load_error)
        seen.add(index)
        taken.append(index)
        if len(taken) >= FORGET_EVERY:
            forget(taken)
            taken = []
        yield result
    if stop.is_set():
        return
    yield from _left(jobs, seen, why or "no result came back from its worker")


def _left(jobs: Sequence[Job], seen: set[int], why: str) -> Iterator[JobResult]:
    for index, job in enumerate(jobs):
        if index not in seen:
            yield JobResult(job=job, status=FAILED, error=f"{job.source}: not run: {why}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__
