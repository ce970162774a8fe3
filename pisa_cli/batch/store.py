"""The key-value store the ranks of a run talk through: what a value read from it may be,
and the listening socket of a store served on this machine alone.

The store (torch.distributed's TCPStore) has no authentication: anyone who reaches its
port can set any key. So values are plain JSON, read by ``decode`` here and checked
field by field by their readers (pisa_cli/batch/messages.py), never unpickled; and a
store we serve ourselves (``--devices``) listens on the loopback address only.

torch is imported inside functions only, as in pisa_cli/batch/distributed.py.
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
from datetime import timedelta
from typing import Any

MAX_MESSAGE_BYTES = 256 << 20
"""The largest value read from the store: a report of ~400,000 results; more is not ours."""


def decode(raw: bytes) -> object:
    """The plain data in a store value: UTF-8 JSON of at most MAX_MESSAGE_BYTES, finite
    numbers only. ValueError when it is anything else."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{len(raw)} bytes, more than the {MAX_MESSAGE_BYTES} allowed")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"not UTF-8 JSON: {reason[:120]}") from None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number")


def progress_of(value: object) -> tuple[int, int, float]:
    """A rank's published progress, [done, total, seconds]; ValueError for anything else."""
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError("progress is not [done, total, seconds]")
    done, total, seconds = value
    counts = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (done, total))
    if not counts or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError("progress is not [done, total, seconds]")
    return done, total, float(seconds)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (MASTER_ADDR) is this machine's loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_store(rank: int, world_size: int, host: str, port: int, wait: timedelta) -> Any:
    """The store of a launch on this machine alone (``--devices``): rank 0 serves it on
    the loopback address only. torch's TCPStore listens on every interface whatever host
    it is given, and anyone who reaches a store can set its keys, so rank 0 opens the
    listening socket itself and hands it over."""
    import torch.distributed as dist

    host = "127.0.0.1" if host == "localhost" else host
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout=wait)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(max(128, world_size))
        store = dist.TCPStore(
            host, port, world_size, True, timeout=wait, master_listen_fd=listener.fileno()
        )
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the socket now
    return store
