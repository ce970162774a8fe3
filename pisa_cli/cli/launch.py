"""How `pisa upscale` is launched: alone, as one rank of torchrun / accelerate launch /
srun (``launch_of``), or with ``--devices``, which starts those ranks itself as worker
processes on this machine (``run_devices``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import typer

from pisa_cli.batch.distributed import RankEnv, parse_devices, rank_environment
from pisa_cli.cli import common
from pisa_cli.cli.signals import handling
from pisa_cli.errors import LaunchError, OptionsError


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
