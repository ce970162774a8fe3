"""How `pisa upscale` is launched: alone (``--ray`` and ``--devices`` start Ray workers from
there); or as one process of torchrun / accelerate launch / srun, which runs
``--shard RANK/WORLD_SIZE`` on cuda:LOCAL_RANK (``launch_of``)."""

from __future__ import annotations

from dataclasses import replace

from pisa_cli.batch.distributed import parse_devices, rank_device, rank_environment
from pisa_cli.batch.shard import Shard
from pisa_cli.cli import spec
from pisa_cli.errors import LaunchError, OptionsError


def launch_of(run: spec.UpscaleSpec, visible_gpus) -> spec.UpscaleSpec:
    """``run`` as this process runs it: under torchrun, accelerate launch or srun, the
    launcher's rank becomes ``--shard RANK/WORLD_SIZE`` on the rank's device (an explicit
    --shard is kept), made the current device once. ``visible_gpus`` (a count) is called
    only then. Raises OptionsError or
    LaunchError for combinations that cannot work."""
    env = rank_environment()
    if run.devices and run.model.device != "auto":
        raise OptionsError("--device and --devices: give one or the other")
    if run.devices:
        parse_devices(run.devices)  # checked before anything runs
    if run.ray and run.ray not in ("local", "auto") and ":" not in run.ray:
        raise OptionsError(
            f"--ray {run.ray}: expected local, auto or a cluster address (host:6379, "
            "ray://host:10001)"
        )
    engine = "--ray" if run.ray else "--devices" if run.devices else ""
    if engine and not run.shard.whole:
        raise OptionsError(f"{engine} and --shard: give one or the other")
    if run.devices and run.ray not in ("", "local"):
        raise OptionsError("--devices runs on a local Ray instance: leave out --ray")
    if not env.distributed:
        return run
    if engine:
        raise LaunchError(
            f"{engine} starts its own workers: run it once, not under {env.launcher} (whose "
            "processes each take --shard RANK/WORLD_SIZE by themselves)"
        )
    if run.shard.whole:
        run = replace(run, shard=Shard(env.rank, env.world_size))
    device = rank_device(run.model.device, env, visible_gpus())
    import torch

    from pisa_cli.models.device import make_current

    make_current(torch.device(device))
    return replace(run, model=replace(run.model, device=device))
