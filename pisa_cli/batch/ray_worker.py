"""The Ray Data side of `--ray` that runs on the workers, importable without Ray: the job
rows the driver plans, the callable class ``map_batches`` runs (one per actor: it loads
the pipeline once and upscales the rows of each batch into their outputs, through the same
runner as one process), and the ledger that makes a killed worker cost only its in-flight
images, and a poison image fail alone.

Rows hold paths and settings, never pixels: each worker reads and writes its own files
(written as temporary files renamed into place, as in one process) and returns small
result rows (a JSON string each). Every error of an image is caught inside the worker: a
UDF exception would abort the whole dataset, and Ray's ``max_errored_blocks`` would drop
the good images of a block with the bad one.

A worker process killed mid-batch (SIGKILL, an out-of-memory kill, ``os._exit``) takes its
batch with it; Ray restarts the actor and retries the task. The ledger (a small actor of
the driver's) remembers, per image, how often it entered the model and the results
already made: a retry returns those without running them again, runs the images that were
in flight one at a time (an image that leaves the model whole is not charged), and fails
an image that has been in the model of a dying worker ATTEMPTS times with one line instead
of running it again.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from pisa_cli.batch.runner import FAILED, JobResult, run_jobs
from pisa_cli.errors import PisaError
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.object_manifest import open_manifest
from pisa_cli.imaging.objects import location
from pisa_cli.options import BatchOptions, ModelOptions, UpscaleOptions

ATTEMPTS = 2
"""Times an image may be in the model of a worker that dies before it is failed."""


def job_rows(jobs: Sequence[Job], order: Sequence[int] | None = None) -> list[dict[str, object]]:
    """The dataset's rows, in ``order`` (indices into ``jobs``; default: as given): each
    job's place in the run and its paths (no pixels)."""
    order = range(len(jobs)) if order is None else order
    return [
        {"index": index, "source": str(jobs[index].source), "output": str(jobs[index].output)}
        for index in order
    ]


def result_to_json(result: JobResult, load_error: int = 0) -> str:
    """A result as the worker returns it (the job is the row's own); ``load_error``: the
    exit code of the worker's failed model load (the whole run stops with it)."""
    plain = {
        "load_error": load_error,
        "status": result.status,
        "error": result.error,
        "seconds": result.seconds,
        "input_size": result.input_size,
        "output_size": result.output_size,
        "input_mode": result.input_mode,
        "timings": result.timings,
        "notes": result.notes,
        "warnings": result.warnings,
        "batch": result.batch,
    }
    return json.dumps(plain, allow_nan=False)


def result_from_json(job: Job, text: str) -> tuple[JobResult, int]:
    """The result of ``job`` from its worker's JSON, and the exit code of a failed model
    load (0: the model loaded)."""
    plain = json.loads(text)
    load_error = plain.pop("load_error")
    for size in ("input_size", "output_size"):
        plain[size] = tuple(plain[size]) if plain[size] is not None else None
    return JobResult(job=job, **plain), load_error


class Ledger:
    """Per image of a run (by row index): how often it entered a worker's model, and its
    result once made. The driver runs it as an actor; tests use it directly."""

    def __init__(self) -> None:
        self.starts: dict[int, int] = {}
        self.results: dict[int, str] = {}

    def started(self, index: int) -> None:
        self.starts[index] = self.starts.get(index, 0) + 1

    def left(self, index: int) -> None:
        """``index`` left the model whole (its worker may still die before returning it)."""
        self.starts[index] = max(0, self.starts.get(index, 0) - 1)

    def finished(self, index: int, result: str) -> None:
        self.results[index] = result

    def forget(self, indices: list[int]) -> None:
        """The driver has these results: their tasks are over, no retry needs them."""
        for index in indices:
            self.starts.pop(index, None)
            self.results.pop(index, None)

    def state(self, indices: list[int]) -> tuple[list[int], list[str | None]]:
        """(times each entered a model, its result or None)."""
        starts = [self.starts.get(index, 0) for index in indices]
        return starts, [self.results.get(index) for index in indices]


class _Remote:
    """A Ledger actor called like a Ledger (each call waits for its answer)."""

    def __init__(self, handle: Any):
        import ray

        self._handle, self._get = handle, ray.get

    def __getattr__(self, name: str) -> Callable:
        method = getattr(self._handle, name)
        return lambda *args: self._get(method.remote(*args))


def died_error(job: Job, attempts: int) -> str:
    return (
        f"{job.source}: its worker died {attempts} times while running it (killed, or out "
        "of memory); not tried again"
    )


class UpscaleWorker:
    """What ``map_batches`` calls on each batch of job rows, on its own actor."""

    def __init__(
        self,
        model: ModelOptions,
        options: UpscaleOptions,
        batch: BatchOptions,
        settings: dict,
        output: str,
        load: Callable[[ModelOptions, UpscaleOptions], Any],
        ledger: Any = None,
    ):
        self.options, self.batch = options, batch
        # a manifest part of its own: no two processes append to one file
        part = secrets.randbelow(10**9) + 1
        self.manifest = open_manifest(location(output), settings, rank=part)
        self.ledger = ledger if ledger is None or isinstance(ledger, Ledger) else _Remote(ledger)
        self.error, self.error_code, self.pipeline = "", 0, None
        try:
            self.pipeline = load(model, options)
            self.pipeline.stages(options)
        except PisaError as error:  # the driver stops the run with this line and its code
            self.error, self.error_code = str(error), error.exit_code

    def __call__(self, rows: dict[str, Any]) -> dict[str, list]:
        indices = [int(index) for index in rows["index"]]
        pairs = zip(rows["source"], rows["output"], strict=True)
        jobs = [Job(location(source), location(output)) for source, output in pairs]
        try:
            results = dict(zip(indices, self._run(indices, jobs), strict=True))
        finally:
            self.manifest.close()  # object storage: this task's records in one part
        return {"index": indices, "result": [results[index] for index in indices]}

    def _run(self, indices: list[int], jobs: list[Job]) -> list[str]:
        if self.ledger is None:
            starts, known = [0] * len(jobs), [None] * len(jobs)
        else:
            starts, known = self.ledger.state(indices)
        out: list[str | None] = list(known)
        todo = []
        for place, (job, count) in enumerate(zip(jobs, starts, strict=True)):
            if out[place] is not None:
                continue
            if self.error:
                failed = JobResult(job=job, status=FAILED, error=self.error)
                out[place] = result_to_json(failed, load_error=self.error_code)
            elif count >= ATTEMPTS:
                out[place] = result_to_json(
                    JobResult(job=job, status=FAILED, error=died_error(job, count))
                )
            else:
                todo.append(place)
        # after a death, the images that were in flight run one at a time: only the one
        # that kills its worker is charged the next time
        alone = any(starts[place] for place in todo)
        chosen = [jobs[place] for place in todo], [indices[place] for place in todo]
        for place, text in self._upscale(*chosen, alone):
            out[todo[place]] = text
        return [text or "" for text in out]

    def _upscale(
        self, jobs: list[Job], indices: list[int], alone: bool
    ) -> Iterable[tuple[int, str]]:
        if not jobs:
            return
        batch = replace(self.batch, image_batch=1) if alone else self.batch
        place = {job: number for number, job in enumerate(jobs)}
        ledger = self.ledger
        previous: list[int] = []

        def started(job: Job) -> None:
            if ledger is None:
                return
            if alone and previous:  # one at a time: the one before left the model whole
                ledger.left(previous.pop())
            ledger.started(indices[place[job]])
            previous.append(indices[place[job]])

        for result in run_jobs(
            self.pipeline, jobs, self.options, batch, manifest=self.manifest, on_start=started
        ):
            text = result_to_json(result)
            if ledger is not None:
                ledger.finished(indices[place[result.job]], text)
            yield place[result.job], text
