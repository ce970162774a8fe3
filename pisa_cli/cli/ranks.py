"""`pisa upscale` over several processes: one rank of a torchrun / accelerate launch / srun
launch (``upscale_as_rank``, driving ``batch.ranks``), and ``--devices``, which starts
those ranks itself (``run_devices``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import typer

from pisa_cli.batch.distributed import RankEnv, parse_devices, rank_environment
from pisa_cli.batch.run import INTERRUPTED_EXIT, PipelineFactory
from pisa_cli.cli import common, spec
from pisa_cli.cli import upscale as single
from pisa_cli.cli.signals import flag_on_signals, handling
from pisa_cli.errors import LaunchError, OptionsError, PisaError


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


def upscale_as_rank(env: RankEnv, run: spec.UpscaleSpec, load: PipelineFactory) -> None:
    """Run this rank's part of the batch; on rank 0, print the summary and write the report."""
    import torch

    from pisa_cli.batch.distributed import join, rank_device

    device = rank_device(run.model.device, env, torch.cuda.is_available())
    run = replace(run, model=replace(run.model, device=device))
    try:
        group = join(env, torch.device(device).type)
    except PisaError as error:
        raise common.fail(error) from None
    try:
        if env.rank == 0:
            _lead(group, run, load)
        else:
            _follow(group, run, load)
    except PisaError as error:  # a lost rank 0 or store
        raise common.fail(error) from None
    finally:
        group.close()


def _warn(text: str) -> None:
    common.say(f"warning: {text}", err=True)


def _share_run(run: spec.UpscaleSpec, load: PipelineFactory, quiet: bool, stop):
    from pisa_cli.batch.ranks import ShareRun
    from pisa_cli.cli.progress import display

    return ShareRun(
        run.model, run.options, run.batch, load, lambda total: display(total, quiet), stop
    )


def _lead(group, run: spec.UpscaleSpec, load: PipelineFactory) -> None:
    from pisa_cli.batch import ranks
    from pisa_cli.cli.signals import stop_on_signals

    start = time.perf_counter()
    try:
        planned = single.plan(run)
        assert planned is not None
        plan, outcome = planned
        if plan.to_run:  # before any rank writes: stale temp files, a write probe
            single.prepare_output(run, outcome)
    except typer.Exit as stop:
        ranks.abort(group, stop.exit_code or 1)
        raise
    jobs = ranks.hand_out(group, plan, run.batch)
    stop = threading.Event()
    how = _share_run(run, load, run.quiet, stop)
    with stop_on_signals(stop, _warn):
        own, error = ranks.run_share(group, jobs[0], plan.reasons, plan.manifest, how)
    if error:
        common.say(f"error: {error}", err=True)
    stopped = threading.Event()
    with flag_on_signals(stopped):
        ranks.collect(group, outcome, own, jobs, plan, stopped.is_set)
    outcome.seconds = time.perf_counter() - start
    for rank in outcome.lost_ranks:
        common.say(
            f"error: rank {rank} stopped without reporting (killed, or its machine gone): "
            f"its {len(jobs[rank])} images are counted as not done (those it finished "
            "are kept and skipped by the next run)",
            err=True,
        )
    single.finish(outcome, run)


def _follow(group, run: spec.UpscaleSpec, load: PipelineFactory) -> None:
    from pisa_cli.batch import ranks
    from pisa_cli.cli.signals import stop_on_signals
    from pisa_cli.imaging.manifest import Manifest

    share = ranks.receive_share(group)
    if share.exit_code is not None:
        raise typer.Exit(share.exit_code)  # rank 0 printed why
    manifest = Manifest(run.output, share.settings, rank=group.env.rank)
    stop = threading.Event()
    how = _share_run(run, load, True, stop)
    with stop_on_signals(stop, _warn):
        own, error = ranks.run_share(group, list(share.jobs), share.reasons, manifest, how)
    group.send(f"report/{group.env.rank}", own)
    if error:
        raise common.fail(PisaError(error))
    if own.interrupted:
        raise typer.Exit(INTERRUPTED_EXIT)


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
        common.say(
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

    with handling(forward):
        stopping = False
        while any(worker.poll() is None for worker in workers):
            failed = any(worker.poll() not in (None, 0) for worker in workers)
            if failed and not stopping:
                stopping = True
                forward(signal.SIGTERM, None)
            time.sleep(0.1)
    return [worker.returncode for worker in workers]


def _free_port() -> int:
    """A TCP port free on this machine now, for rank 0's store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
