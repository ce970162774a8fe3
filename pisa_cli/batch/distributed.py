"""One batch over several processes: which rank this is, which inputs it runs, and how the
ranks tell rank 0 what they did.

A launcher (torchrun, accelerate launch, Slurm's srun, or ``pisa upscale --devices``)
starts the same command once per device. Each process reads its rank from the
environment (``rank_environment``) and joins a torch.distributed process group (gloo,
GPUs or not: the group runs no collective, so nccl would only add its start-up and its
GPU memory). Rank 0 decides what to run (the manifest's resume decisions) and
splits the remaining inputs by pixel count (``shard_by_weight``); every rank runs its
share and sends its results back through the group's key-value store, as plain JSON
checked on the way in (pisa_cli/batch/store.py, pisa_cli/batch/messages.py): the store has
no authentication, so a value that does not fit loses one rank, and runs nothing.

Why the store and not a collective: a collective needs every rank, so one killed rank
would hang the others in it until a timeout meant for the slowest image. The store is
served by rank 0 (or by torchrun's agent) and outlives a dead rank. Each rank beats a
heartbeat into it once a second; a rank whose heartbeat stops for ``PISA_RANK_TIMEOUT``
seconds is given up on, and the others end with its images counted as not done.

torch is imported inside functions only: the environment parsing and the sharding are
used before any model is loaded, and by ``pisa --help``'s import chain.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pisa_cli.batch.store import decode, is_loopback, loopback_store, progress_of
from pisa_cli.errors import LaunchError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "PISA_RANK_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
"""Seconds a rank may stay silent (not joining, no heartbeat) before the others give up on it."""
BEAT_SECONDS = 1.0
POLL_SECONDS = 0.25
INTERRUPTED_TIMEOUT = 5.0
"""Once stopped (Ctrl-C, SIGTERM from the launcher), wait this long for a silent rank: a
launcher that stops everyone when one rank dies kills the rest soon after."""
PREFIX = "pisa/"
SILENT = "killed, or its machine gone"


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


def rank_timeout(environ: Mapping[str, str] | None = None) -> float:
    """PISA_RANK_TIMEOUT in seconds (default 300)."""
    environ = os.environ if environ is None else environ
    text = environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise LaunchError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds above 0")
    return value


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


def shard_by_weight(weights: Sequence[int], parts: int) -> list[list[int]]:
    """Split item indices into ``parts`` shares of nearly equal total weight.

    Largest first, each to the share with the least weight so far (ties: the lower share
    number), so the heaviest and lightest shares differ by at most the heaviest item. Each
    share lists its items in their original order. The result depends only on the
    weights: every rank computes the same split.
    """
    if parts < 1:
        raise ValueError("parts must be at least 1")
    shares: list[list[int]] = [[] for _ in range(parts)]
    loads = [(0, part) for part in range(parts)]
    heapq.heapify(loads)
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, part = heapq.heappop(loads)
        shares[part].append(index)
        heapq.heappush(loads, (load + max(0, weights[index]), part))
    return [sorted(share) for share in shares]


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


@dataclass(frozen=True)
class RankProgress:
    """One rank's progress as rank 0 sees it."""

    rank: int
    done: int
    total: int
    seconds: float
    """Since the rank started its first image."""

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.done and self.seconds > 0 else 0.0


class RankLost(LaunchError):
    """A rank stopped beating (killed, or its machine gone) or its store is unreachable."""


class Group:
    """This rank's membership of the run: the process group, its store, a heartbeat."""

    def __init__(self, env: RankEnv, store: Any, timeout: float):
        self.env = env
        self.store = store
        self.timeout = timeout
        self.progress = (0, 0, 0.0)
        """(done, total, seconds) of this rank, published with each heartbeat."""
        self._stop = threading.Event()
        self._beats: dict[int, tuple[int | None, float]] = {}
        self._beating = threading.Thread(target=self._beat, name="pisa-heartbeat", daemon=True)
        self._beating.start()

    def _beat(self) -> None:
        rank, count = self.env.rank, 0
        while True:
            count += 1
            try:  # set, not add: the store's add ends the connection on a key not a number
                self.store.set(f"{PREFIX}beat/{rank}", str(count))
                self.store.set(f"{PREFIX}progress/{rank}", json.dumps(self.progress))
            except Exception:  # the store is gone (rank 0 ended): the waits below say so
                pass
            if self._stop.wait(BEAT_SECONDS):
                return

    def close(self) -> None:
        """Stop beating and leave the process group."""
        self._stop.set()
        self._beating.join(timeout=5)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def send(self, name: str, value: object) -> None:
        """Publish ``value`` (plain data: dicts, lists, strings, numbers) under ``name``."""
        payload = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
        try:
            self.store.set(f"{PREFIX}{name}", payload)
        except Exception as error:
            raise RankLost(f"{self.env}: cannot reach rank 0 ({_first_line(error)})") from None

    def _silent(self, rank: int, timeout: float) -> bool:
        """Whether ``rank``'s heartbeat has not moved for ``timeout`` seconds."""
        count = self._beat_count(rank)
        now = time.monotonic()
        last, since = self._beats.get(rank, (None, now))
        if count != last:
            self._beats[rank] = (count, now)
            return False
        return now - since > timeout

    def _beat_count(self, rank: int) -> int:
        """The heartbeat counter of ``rank``: 0 before its first beat, -1 when its key
        holds something else (set by someone other than the rank): it then never moves."""
        key = f"{PREFIX}beat/{rank}"
        if not self.store.check([key]):
            return 0
        text = self.store.get(key)
        return int(text) if len(text) <= 20 and text.isdigit() else -1

    def receive(
        self,
        names: dict[int, str],
        stopped: Callable[[], bool] = lambda: False,
        parse: Callable[[object, int], object] = lambda value, rank: value,
    ) -> tuple[dict[int, object], dict[int, str]]:
        """Wait for each rank's value (``names``: rank -> name), plain JSON data checked by
        ``parse(value, rank)`` (raising: not usable); return (values by rank, ranks given up
        on with why: silent, or what they sent did not fit). Raises RankLost when the store
        itself is gone."""
        values: dict[int, object] = {}
        lost: dict[int, str] = {}
        waiting = dict(names)
        while waiting:
            timeout = INTERRUPTED_TIMEOUT if stopped() else self.timeout
            try:
                for rank, name in list(waiting.items()):
                    key = f"{PREFIX}{name}"
                    if self.store.check([key]):
                        del waiting[rank]
                        value, why = _parsed(self.store.get(key), rank, name, parse)
                        if why:
                            lost[rank] = why
                        else:
                            values[rank] = value
                    elif self._silent(rank, timeout):
                        lost[rank] = f"rank {rank} stopped without reporting ({SILENT})"
                        del waiting[rank]
            except Exception as error:
                raise RankLost(f"{self.env}: lost rank 0 ({_first_line(error)})") from None
            if waiting:
                time.sleep(POLL_SECONDS)
        return values, dict(sorted(lost.items()))

    def ranks_progress(self) -> list[RankProgress]:
        """Every rank's last published progress (zeros for a rank not heard from yet, or
        whose progress is not three numbers)."""
        progress = []
        for rank in range(self.env.world_size):
            key = f"{PREFIX}progress/{rank}"
            shown = RankProgress(rank, 0, 0, 0.0)
            with contextlib.suppress(Exception):  # a display is never worth a crash
                if self.store.check([key]):
                    shown = RankProgress(rank, *progress_of(decode(self.store.get(key))))
            progress.append(shown)
        return progress


def _parsed(
    raw: bytes, rank: int, name: str, parse: Callable[[object, int], object]
) -> tuple[object, str]:
    """(the value, '') or (None, the line saying why ``rank``'s value is not usable)."""
    try:
        return parse(decode(raw), rank), ""
    except Exception as error:  # whatever the store holds loses that rank, never the run
        what = name.split("/")[0]
        return None, f"rank {rank} sent a {what} that is not usable ({_first_line(error)[:200]})"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def join(env: RankEnv, device_type: str, timeout: float | None = None) -> Group:
    """Join the launch's process group (gloo on every device: only its store is used) and
    start beating.

    Raises LaunchError with one line when the group cannot be set up (no MASTER_ADDR or
    MASTER_PORT, the port taken, ranks that never arrive within the timeout).
    """
    timeout = rank_timeout() if timeout is None else timeout
    import torch.distributed as dist

    where = f"{env} ({env.launcher})"
    if not dist.is_available():
        raise LaunchError(f"{where}: this torch was built without torch.distributed")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise LaunchError(
            f"{where}: {' and '.join(missing)} not set; launch with torchrun, or export "
            "MASTER_ADDR (the first node's address) and MASTER_PORT before srun"
        )
    backend = "gloo"  # not nccl on GPUs: no collective runs, the store is all we use
    host, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    address = f"{host}:{port}"
    wait = timedelta(seconds=timeout)
    try:
        _init_group(env, backend, host, int(port), wait)
        store = dist.distributed_c10d._get_default_store()
    except Exception as error:
        raise LaunchError(
            f"{where}: cannot set up the process group ({backend} at {address}): "
            f"{_first_line(error)}"
        ) from None
    log.info("%s joined the process group (%s at %s)", env, backend, address)
    return Group(env, store, timeout)


def _init_group(env: RankEnv, backend: str, host: str, port: int, wait: timedelta) -> None:
    import torch.distributed as dist

    ranks = {"rank": env.rank, "world_size": env.world_size, "timeout": wait}
    if is_loopback(host) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        store = loopback_store(env.rank, env.world_size, host, port, wait)
        # under the prefix env:// puts its store under: the same keys either way
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), **ranks)
    else:  # torchrun's agent serves the store, or ranks on other machines must reach it
        dist.init_process_group(backend, init_method="env://", **ranks)
