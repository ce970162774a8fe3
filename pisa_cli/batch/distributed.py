"""Which process of a launch this is (torchrun, accelerate launch, Slurm's srun), the device
it takes, and the devices ``--devices`` names.

A launcher starts the same command once per device; each process reads its rank from the
environment (``rank_environment``) and runs ``--shard RANK/WORLD_SIZE`` on
cuda:LOCAL_RANK (``rank_device``): no process talks to another, nothing listens on a port
(see ``batch/shard.py``). Scheduling across machines with retries is Ray's (``--ray``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pisa_cli.errors import LaunchError


@dataclass(frozen=True)
class RankEnv:
    """Where this process stands in a launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    """The rank on this machine: the GPU it takes (cuda:LOCAL_RANK)."""
    launcher: str = "single"
    """torchrun (also accelerate launch and ``--devices``), slurm, or single."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise LaunchError(
                f"{self.launcher} environment: rank {self.rank} of {self.world_size} "
                f"(local rank {self.local_rank}) is not a valid rank; check the launch"
            )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def _integer(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(str(text).strip())
    except ValueError:
        raise LaunchError(
            f"{name}={text!r}: expected a whole number (set by the launcher)"
        ) from None


def rank_environment(environ: Mapping[str, str] | None = None) -> RankEnv:
    """The rank of this process from the launcher's variables.

    torchrun and accelerate launch set RANK, WORLD_SIZE and LOCAL_RANK (these win when
    both kinds are there: torchrun started by srun). srun sets SLURM_PROCID, SLURM_LOCALID
    and the step's task count; they count only inside an srun step (SLURM_STEP_ID set),
    since an sbatch script itself also carries SLURM_PROCID=0 and the job's SLURM_NTASKS
    while being a single process.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank = _integer(environ, "RANK")
        return RankEnv(
            rank, _integer(environ, "WORLD_SIZE"), _integer(environ, "LOCAL_RANK", 0), "torchrun"
        )
    in_step = "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ
    tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    if in_step and "SLURM_PROCID" in environ and tasks in environ:
        rank = _integer(environ, "SLURM_PROCID")
        local = _integer(environ, "SLURM_LOCALID", 0)
        return RankEnv(rank, _integer(environ, tasks), local, "slurm")
    return RankEnv()


def rank_device(requested: str, env: RankEnv, cuda_count: int) -> str:
    """The device of this rank, with ``cuda_count`` GPUs visible to it: ``auto`` and
    ``cuda`` become cuda:{LOCAL_RANK mod cuda_count} (cuda:0 where each rank sees only its
    own GPU: ``srun --gpus-per-task=1``, Kubernetes) when there are GPUs (``auto`` falls back
    to the CPU); anything else is taken as given."""
    if requested == "cuda" or (requested == "auto" and cuda_count > 0):
        return f"cuda:{env.local_rank % cuda_count}" if cuda_count > 0 else "cuda"
    if requested == "auto" and env.distributed:
        return "cpu"  # not MPS: one Apple GPU cannot be shared by several ranks usefully
    return requested


def parse_devices(text: str) -> list[str]:
    """``--devices 0,1,2,3`` -> cuda:0 ... cuda:3; ``cpu,cpu`` -> two CPU workers;
    ``cuda:1,cuda:2`` as given."""
    devices = []
    for item in (part.strip() for part in text.split(",")):
        if item.isdigit():
            devices.append(f"cuda:{item}")
        elif item == "cpu" or (item.startswith("cuda:") and item[5:].isdigit()):
            devices.append(item)
        else:
            raise LaunchError(
                f"--devices {text}: {item!r} is not a device; use GPU numbers (0,1,2,3), "
                "cuda:N or cpu, separated by commas"
            )
    return devices


HEADER_THREADS = 8
"""Image headers read at once: on network storage the time is latency, not bandwidth."""


def pixel_weights(sources: Sequence[Path], max_pixels: int | None = None) -> list[int]:
    """Each input's pixel count from its header (no decoding); 1 for a file whose header
    cannot be read or that has more than ``max_pixels`` (it fails fast wherever it lands)."""
    from concurrent.futures import ThreadPoolExecutor

    from pisa_cli.errors import ImageError
    from pisa_cli.imaging.io import read_size

    def pixels(source: Path) -> int:
        try:
            width, height = read_size(source)
        except (ImageError, OSError):
            return 1
        if max_pixels is not None and width * height > max_pixels:
            return 1
        return max(1, width * height)

    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        return list(pool.map(pixels, sources))
