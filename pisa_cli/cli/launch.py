"""How `pisa upscale` is launched: alone; as one process of torchrun / accelerate launch /
srun, which runs ``--shard RANK/WORLD_SIZE`` on cuda:LOCAL_RANK (``launch_of``); or with
``--devices``, which starts one worker process per device, each its own share
(``run_devices``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import typer

from pisa_cli.batch.distributed import parse_devices, rank_device, rank_environment
from pisa_cli.batch.shard import Shard
from pisa_cli.cli import common, spec
from pisa_cli.cli.signals import handling
from pisa_cli.errors import LaunchError, OptionsError


def launch_of(run: spec.UpscaleSpec, cuda_available) -> spec.UpscaleSpec:
    """``run`` as this process runs it: under torchrun, accelerate launch or srun, the
    launcher's rank becomes ``--shard RANK/WORLD_SIZE`` on the rank's device (an explicit
    --shard is kept). ``cuda_available`` is called only then. Raises OptionsError or
    LaunchError for combinations that cannot work."""
    env = rank_environment()
    if run.devices and run.model.device != "auto":
        raise OptionsError("--device and --devices: give one or the other")
    if run.devices:
        parse_devices(run.devices)  # checked before anything runs
    if run.devices and not run.shard.whole:
        raise OptionsError("--devices and --shard: give one or the other")
    if not env.distributed:
        return run
    if run.devices:
        raise LaunchError(f"--devices starts its own processes: leave it out under {env.launcher}")
    if run.shard.whole:
        run = replace(run, shard=Shard(env.rank, env.world_size))
    device = rank_device(run.model.device, env, cuda_available())
    return replace(run, model=replace(run.model, device=device))


def worker_arguments(context: typer.Context) -> list[str]:
    """This command's arguments, rebuilt from what was parsed, without --devices and
    --device: every worker runs the same command on its own device."""
    options, inputs = [], []
    for param in context.command.params:
        value = context.params.get(param.name)
        if param.name in ("devices", "device", "shard") or value is None or value == "":
            continue
        if param.param_type_name == "argument":
            inputs = [str(item) for item in value]
        elif getattr(param, "is_flag", False):
            options += [param.opts[0]] if value else []
        else:
            options += [param.opts[0], str(value)]
    return [*options, "--", *inputs]


def run_devices(devices: list[str], context: typer.Context) -> None:
    """--devices: one worker process per device, each running its share (--shard K/N);
    exit with the worst code. A worker that dies stops the others: finished images are
    kept, and the same command run again does the rest."""
    arguments = worker_arguments(context)
    workers = []
    for index, device in enumerate(devices):
        shard = f"{index}/{len(devices)}"
        command = [sys.executable, "-m", "pisa_cli", "upscale", "--device", device]
        command += ["--shard", shard, *arguments]
        # their own session: a terminal's Ctrl-C reaches them once, forwarded by us
        workers.append(subprocess.Popen(command, start_new_session=True, env=dict(os.environ)))
    codes = _wait_all(workers)
    for device, code in zip(devices, codes, strict=True):
        if code < 0:
            common.say(
                f"error: the worker on {device} ended by signal {-code}; the images finished "
                "are kept, run the same command again to do the rest",
                err=True,
            )
    worst = max((1 if code < 0 else code for code in codes), default=0)
    if worst:
        raise typer.Exit(worst)


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
