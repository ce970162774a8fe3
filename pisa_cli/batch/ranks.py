"""A batch over several processes, rank by rank (the launch itself is the CLI's).

Rank 0 does what a single process does before the model (discovery, settings, resume
decisions), splits the images left to run by pixel count and hands each rank its share
through the store (``hand_out``); every rank loads the model and runs its share into the
same output folder, each appending to its own manifest file (``run_share``); rank 0
collects the others' results (``collect``) for the one summary and report. See
``batch/distributed.py`` for the exchange and what happens when a rank dies.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pisa_cli.batch.distributed import Group, RankLost, RankProgress
from pisa_cli.batch.messages import RankReport, Share
from pisa_cli.batch.plan import RunPlan
from pisa_cli.batch.run import Display, Outcome, PipelineFactory, StreamSpec, prepare, stream
from pisa_cli.errors import PisaError
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.manifest import Manifest
from pisa_cli.options import BatchOptions, ModelOptions, UpscaleOptions

PROGRESS_SECONDS = 1.0
"""How often rank 0 reads the other ranks' progress for its display."""


def abort(group: Group, exit_code: int) -> None:
    """Rank 0 stopped before the run: tell every other rank to exit with ``exit_code``."""
    for rank in range(1, group.env.world_size):
        group.send(f"share/{rank}", Share(exit_code=exit_code).to_plain())


def hand_out(group: Group, plan: RunPlan, batch: BatchOptions) -> list[list[Job]]:
    """Split the jobs to run by pixel count and send each rank its share; rank 0's first."""
    from pisa_cli.batch.distributed import pixel_weights, shard_by_weight

    world = group.env.world_size
    weights = pixel_weights([job.source for job in plan.to_run], batch.max_pixels)
    jobs = [[plan.to_run[i] for i in share] for share in shard_by_weight(weights, world)]
    settings = json.loads(json.dumps(plan.settings, default=str))  # as the manifest has it
    for rank in range(1, world):
        mine = {job: plan.reasons[job] for job in jobs[rank]}
        group.send(f"share/{rank}", Share(tuple(jobs[rank]), mine, settings).to_plain())
    return jobs


def receive_share(group: Group, output: Path) -> Share:
    """A rank's share from rank 0, checked (every output inside ``output``); RankLost when
    rank 0 is gone or what it sent does not fit."""
    shares, lost = group.receive(
        {0: f"share/{group.env.rank}"}, parse=lambda plain, rank: Share.from_plain(plain, output)
    )
    if lost:
        raise RankLost(f"{group.env}: no share of the images: {lost[0]}")
    return shares[0]  # type: ignore[return-value]


def send_report(group: Group, report: RankReport, share: Share) -> None:
    """This rank's report to rank 0, as plain data."""
    group.send(f"report/{group.env.rank}", report.to_plain(share.jobs))


@dataclass(frozen=True)
class ShareRun:
    """How a rank runs its share (the same for every rank of a run)."""

    model: ModelOptions
    options: UpscaleOptions
    batch: BatchOptions
    load: PipelineFactory
    display: Callable[[int], contextlib.AbstractContextManager[Display]]
    """The display for a share of N images (rank 0's progress bar; quiet elsewhere)."""
    stop: threading.Event


def run_share(
    group: Group, jobs: list[Job], reasons: dict, manifest: Manifest, how: ShareRun
) -> tuple[RankReport, str]:
    """Run this rank's jobs (none: nothing to load): its report, and the error line when
    its model did not load (its images then count as not done)."""
    if not jobs:
        group.progress = (0, 0, 0.0)
        return RankReport(), ""
    outcome = Outcome()
    group.progress = (0, len(jobs), 0.0)
    try:
        prepared = prepare(jobs, how.model, how.options, how.batch, how.load)
    except PisaError as error:
        return RankReport(not_done=len(jobs), failed_to_start=True), str(error)
    with how.display(len(jobs)) as shown:
        spec = StreamSpec(
            jobs=tuple(jobs), reasons=reasons, options=how.options, batch=how.batch,
            manifest=manifest,
        )  # fmt: skip
        watch = watch_ranks(group, len(jobs))
        stream(spec, prepared, outcome, display=shown, stop=how.stop, watch=watch)
    done, seconds = len(outcome.results), outcome.run_seconds
    group.progress = (done, len(jobs), seconds)
    report = RankReport(outcome.results, outcome.not_done, outcome.interrupted, seconds)
    return report, ""


def collect_reports(
    group: Group, jobs: list[list[Job]], stopped: Callable[[], bool]
) -> tuple[dict[int, RankReport], dict[int, str]]:
    """Every other rank's report, each checked against the jobs it was handed; (reports by
    rank, ranks lost with the line saying why: silent, or what they sent does not fit)."""
    names = {rank: f"report/{rank}" for rank in range(1, group.env.world_size)}
    reports, lost = group.receive(
        names, stopped, parse=lambda plain, rank: RankReport.from_plain(plain, jobs[rank])
    )
    return reports, lost  # type: ignore[return-value]


def collect(
    group: Group, outcome: Outcome, own: RankReport, jobs: list[list[Job]], plan: RunPlan,
    stopped: Callable[[], bool],
) -> dict[int, str]:  # fmt: skip
    """Every rank's results into rank 0's ``outcome``, in input order; ranks that never
    report (or while ``stopped()`` holds, stop answering), or whose report does not fit,
    are lost: returned with the line saying why."""
    reports, lost = collect_reports(group, jobs, lambda: stopped() or own.interrupted)
    reports[0] = own
    order = {job: index for index, job in enumerate(plan.to_run)}
    results = [result for report in reports.values() for result in report.results]
    outcome.results += sorted(results, key=lambda result: order.get(result.job, 0))
    outcome.not_done += sum(report.not_done for report in reports.values())
    outcome.not_done += sum(len(jobs[rank]) for rank in lost)
    outcome.interrupted = any(report.interrupted for report in reports.values())
    outcome.lost_ranks = sorted(lost)
    outcome.ranks = group.env.world_size
    # the ranks ran side by side: the run took as long as the slowest (models loaded aside)
    outcome.run_seconds = max(report.run_seconds for report in reports.values())
    return lost


def watch_ranks(group: Group, total: int):
    """A Watch (see ``run.stream``): publish this rank's progress with each heartbeat; rank
    0 also shows every rank's, with the time left."""

    @contextlib.contextmanager
    def watch(shown: Display, processed) -> Iterator[None]:
        stop = threading.Event()

        def publish() -> None:
            while not stop.wait(PROGRESS_SECONDS):
                done, seconds = processed()
                group.progress = (done, total, seconds)
                if group.env.rank != 0:
                    continue
                with contextlib.suppress(Exception):  # a display update is never worth a crash
                    progress = group.ranks_progress()
                    progress[0] = RankProgress(0, done, total, seconds)
                    shown.ranks(progress)

        thread = threading.Thread(target=publish, name="pisa-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    return watch
