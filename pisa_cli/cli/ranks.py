"""`pisa upscale` over several processes: one rank of a torchrun / accelerate launch / srun
launch (``upscale_as_rank``), and ``--devices``, which starts those ranks itself
(``run_devices``).

Rank 0 does what a single process does before the model (discovery, settings, resume
decisions), splits the images left to run by pixel count and hands each rank its share
through the store; every rank loads the model and runs its share into the same output
folder (each appending to its own manifest file); rank 0 collects the others' results and
prints the one summary and report. See pisa_cli/distributed.py for the exchange and what
happens when a rank dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import typer

from pisa_cli.cli import common
from pisa_cli.cli import upscale as single
from pisa_cli.distributed import Group, RankEnv, RankProgress, parse_devices, rank_environment
from pisa_cli.errors import LaunchError, OptionsError, PisaError
from pisa_cli.rank_messages import RankReport, Share

PROGRESS_SECONDS = 1.0
"""How often rank 0 reads the other ranks' progress for its display."""


def launch_of(devices: str, model, dry_run: bool) -> RankEnv | list[str] | None:
    """None for a plain run; the devices to start workers on (--devices); or this process's
    RankEnv under torchrun, accelerate launch or srun. A dry run is never distributed."""
    env = rank_environment()
    if devices:
        if env.distributed:
            raise LaunchError(
                f"--devices starts its own processes: leave it out under {env.launcher}"
            )
        if model.device != "auto":
            raise OptionsError("--device and --devices: give one or the other")
        listed = parse_devices(devices)
        if dry_run or len(listed) == 1:
            return None
        return listed
    if not env.distributed:
        return None
    if dry_run:
        if env.rank != 0:
            raise typer.Exit(0)  # rank 0 prints the plans
        return None
    return env


def upscale_as_rank(
    env: RankEnv, inputs, output: Path, model_options, options, batch, quiet: bool, report
) -> None:
    """Run this rank's part of the batch; on rank 0, print the summary and write the report."""
    import torch

    from pisa_cli.distributed import join, rank_device

    device = rank_device(model_options.device, env, torch.cuda.is_available())
    model_options = replace(model_options, device=device)
    try:
        group = join(env, torch.device(device).type)
    except PisaError as error:
        raise common.fail(error) from None
    try:
        if env.rank == 0:
            _lead(group, inputs, output, model_options, options, batch, quiet, report)
        else:
            _follow(group, output, model_options, options, batch)
    except PisaError as error:  # a lost rank 0 or store
        raise common.fail(error) from None
    finally:
        group.close()


def _lead(group: Group, inputs, output, model_options, options, batch, quiet, report) -> None:
    from pisa_cli.distributed import pixel_weights, shard_by_weight

    start = time.perf_counter()
    world = group.env.world_size
    try:
        planned = single.plan_run(inputs, output, model_options, options, batch, False, quiet)
        assert planned is not None
        outcome, to_run, reasons, manifest = planned
        if to_run:
            single.prepare_output(output, batch)  # before any rank writes: stale temp files
    except typer.Exit as stop:
        for rank in range(1, world):
            group.send(f"share/{rank}", Share(exit_code=stop.exit_code or 1).to_plain())
        raise
    shares = shard_by_weight(pixel_weights([job.source for job in to_run]), world)
    jobs = [[to_run[index] for index in share] for share in shares]
    settings = json.loads(json.dumps(outcome.settings, default=str))  # as the manifest has it
    for rank in range(1, world):
        mine = {job: reasons[job] for job in jobs[rank]}
        group.send(f"share/{rank}", Share(tuple(jobs[rank]), mine, settings).to_plain())
    outcome.ranks = world
    own = _run_share(group, jobs[0], reasons, model_options, options, batch, manifest, quiet)
    stopped = threading.Event()
    with _stop_flag(stopped):
        reports, lost = collect_reports(group, jobs, lambda: stopped.is_set() or own.interrupted)
    reports[0] = own
    _merge(outcome, reports, sorted(lost), jobs, to_run)
    outcome.seconds = time.perf_counter() - start
    for rank, why in lost.items():
        typer.echo(
            f"error: {why}: its {len(jobs[rank])} images are counted as not done (those it "
            "finished are kept and skipped by the next run)",
            err=True,
        )
    single.finish(outcome, report)


def collect_reports(
    group: Group, jobs: list[list], stopped: Callable[[], bool]
) -> tuple[dict[int, RankReport], dict[int, str]]:
    """Every other rank's report, each checked against the jobs it was handed; (reports by
    rank, ranks lost with the line saying why: silent, or what they sent does not fit)."""
    names = {rank: f"report/{rank}" for rank in range(1, group.env.world_size)}
    reports, lost = group.receive(
        names, stopped, parse=lambda plain, rank: RankReport.from_plain(plain, jobs[rank])
    )
    return reports, lost  # type: ignore[return-value]


def _merge(outcome, reports: dict, lost: list[int], jobs: list[list], to_run: list) -> None:
    """Every rank's results into rank 0's outcome, in input order."""
    order = {job: index for index, job in enumerate(to_run)}
    results = [result for report in reports.values() for result in report.results]
    outcome.results += sorted(results, key=lambda result: order.get(result.job, 0))
    outcome.not_done += sum(report.not_done for report in reports.values())
    outcome.not_done += sum(len(jobs[rank]) for rank in lost)
    outcome.interrupted = any(report.interrupted for report in reports.values())
    outcome.lost_ranks = lost
    # the ranks ran side by side: the run took as long as the slowest (models loaded aside)
    outcome.run_seconds = max(report.run_seconds for report in reports.values())


def _follow(group: Group, output: Path, model_options, options, batch) -> None:
    from pisa_cli.distributed import RankLost
    from pisa_cli.imaging.manifest import Manifest

    shares, lost = group.receive(
        {0: f"share/{group.env.rank}"}, parse=lambda plain, rank: Share.from_plain(plain, output)
    )
    if lost:
        raise RankLost(f"{group.env}: no share of the images: {lost[0]}")
    share: Share = shares[0]  # type: ignore[assignment]
    if share.exit_code is not None:
        raise typer.Exit(share.exit_code)  # rank 0 printed why
    manifest = Manifest(output, share.settings, rank=group.env.rank)
    own = _run_share(
        group, list(share.jobs), share.reasons, model_options, options, batch, manifest, quiet=True
    )
    group.send(f"report/{group.env.rank}", own.to_plain(share.jobs))
    if own.failed_to_start:
        raise typer.Exit(1)
    if own.interrupted:
        raise typer.Exit(single.INTERRUPTED_EXIT)


def _run_share(group, jobs, reasons, model_options, options, batch, manifest, quiet) -> RankReport:
    """Run this rank's jobs (none: nothing to load); its results as a RankReport."""
    if not jobs:
        group.progress = (0, 0, 0.0)
        return RankReport()
    outcome = single.Outcome()
    group.progress = (0, len(jobs), 0.0)
    try:
        single.process(
            jobs,
            reasons,
            model_options,
            options,
            batch,
            manifest,
            quiet,
            outcome,
            watch=lambda shown, processed: _watch(group, shown, processed, len(jobs)),
        )
    except typer.Exit:  # the model did not load here; the line saying why is printed
        return RankReport(not_done=len(jobs), failed_to_start=True)
    done, seconds = len(outcome.results), outcome.run_seconds
    group.progress = (done, len(jobs), seconds)
    return RankReport(outcome.results, outcome.not_done, outcome.interrupted, seconds)


@contextlib.contextmanager
def _watch(group: Group, shown, processed, total: int) -> Iterator[None]:
    """Publish this rank's progress (sent with each heartbeat); rank 0 also shows every
    rank's, with the time left."""
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


@contextlib.contextmanager
def _stop_flag(stopped: threading.Event) -> Iterator[None]:
    """While rank 0 waits for the others, Ctrl-C or SIGTERM (torchrun stopping everyone
    after a rank died) shortens the wait for silent ranks instead of killing rank 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(number: int, frame: object) -> None:
        stopped.set()

    previous = {number: signal.signal(number, handler) for number in single.stop_signals()}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def worker_arguments(context: typer.Context) -> list[str]:
    """This command's arguments, rebuilt from what was parsed, without --devices and
    --device: every worker runs the same command on its own device."""
    options, inputs = [], []
    for param in context.command.params:
        value = context.params.get(param.name)
        if param.name in ("devices", "device") or value is None:
            continue
        if param.param_type_name == "argument":
            inputs = [str(item) for item in value]
        elif getattr(param, "is_flag", False):
            options += [param.opts[0]] if value else []
        else:
            options += [param.opts[0], str(value)]
    return [*options, "--", *inputs]


def run_devices(devices: list[str], context: typer.Context) -> None:
    """--devices: one worker process per device, ranks of one run on this machine; exit
    with rank 0's code. A worker that dies stops the others (as torchrun does): finished
    images are kept, and the same command run again does the rest."""
    arguments = worker_arguments(context)
    port = _free_port()
    workers = []
    for rank, device in enumerate(devices):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(devices)))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, "-m", "pisa_cli", "upscale", "--device", device, *arguments]
        # their own session: a terminal's Ctrl-C reaches them once, forwarded by us
        workers.append(subprocess.Popen(command, env=env, start_new_session=True))
    codes = _wait_all(workers)
    if codes[0] < 0:
        typer.echo(
            f"error: rank 0 ({devices[0]}) ended by signal {-codes[0]}: no summary; the "
            "images finished are kept, run the same command again to do the rest",
            err=True,
        )
        raise typer.Exit(1)
    if codes[0]:
        raise typer.Exit(codes[0])


def _wait_all(workers: list[subprocess.Popen]) -> list[int]:
    """Wait for every worker, forwarding SIGINT and SIGTERM; when one fails, stop the rest."""

    def forward(number: int, frame: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(number)

    previous = {number: signal.signal(number, forward) for number in single.stop_signals()}
    try:
        stopping = False
        while any(worker.poll() is None for worker in workers):
            failed = any(worker.poll() not in (None, 0) for worker in workers)
            if failed and not stopping:
                stopping = True
                forward(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
    return [worker.returncode for worker in workers]


def _free_port() -> int:
    """A TCP port free on this machine now, for rank 0's store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
