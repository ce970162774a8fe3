"""Read-ahead and write-behind: background threads that keep the model from waiting for
decoding and encoding, with a bound on how many images wait in memory.

Decoding (Pillow, zlib, libjpeg) and encoding release the interpreter lock for most of
their work, as does torch, so one thread each way overlaps them with the model.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_END = object()
POLL_SECONDS = 0.1
"""How often a blocked reader thread checks whether it was told to stop."""


@dataclass(frozen=True)
class Loaded(Generic[T, R]):
    """One item and what loading it gave: a value, or the exception it raised."""

    item: T
    value: R | None
    error: Exception | None
    seconds: float


def _load(item: T, load: Callable[[T], R]) -> Loaded[T, R]:
    start = time.perf_counter()
    try:
        value = load(item)
    except Exception as error:  # handed to the consumer, which decides what it means
        return Loaded(item, None, error, time.perf_counter() - start)
    return Loaded(item, value, None, time.perf_counter() - start)


def read_ahead(items: Iterable[T], load: Callable[[T], R], depth: int) -> Iterator[Loaded[T, R]]:
    """``load`` each item, in order, up to ``depth`` items ahead of the consumer on a
    background thread (``depth`` 0: in the consumer's thread, one at a time).

    At most ``depth`` loaded items wait, plus the one the thread holds while it waits for
    room. Closing the iterator (or leaving a for loop early) stops the thread.
    """
    if depth <= 0:
        for item in items:
            yield _load(item, load)
        return
    waiting: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                waiting.put(value, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if stop.is_set() or not put(_load(item, load)):
                    return
        finally:
            put(_END)

    thread = threading.Thread(target=work, name="pisa-read-ahead", daemon=True)
    thread.start()
    try:
        while (loaded := waiting.get()) is not _END:
            yield loaded  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


class WriteBehind:
    """Runs save jobs on one background thread, in order; ``submit`` blocks while ``depth``
    jobs wait, so finished images cannot pile up in memory. ``depth`` 0 saves in the
    caller's thread."""

    def __init__(self, depth: int):
        self.depth = depth
        self._executor = ThreadPoolExecutor(1, "pisa-write-behind") if depth > 0 else None
        self._slots = threading.BoundedSemaphore(max(depth, 1))

    def submit(self, function: Callable[..., R], *args: object) -> Future:
        if self._executor is None:
            future: Future = Future()
            try:
                future.set_result(function(*args))
            except Exception as error:
                future.set_exception(error)
            return future
        self._slots.acquire()
        try:
            future = self._executor.submit(function, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def close(self, cancel: bool = False) -> None:
        """Wait for the running save; with ``cancel``, drop the ones not started."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)
