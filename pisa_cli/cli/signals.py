"""Signal handlers set for the time of a block and restored after it (Ctrl-C and SIGTERM)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def handling(handler: Callable[[int, object], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM inside the block, the previous ones after it
    (signals can only be handled in the main thread: elsewhere nothing is changed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


@contextmanager
def stop_on_signals(stop: threading.Event, warn: Callable[[str], None]) -> Iterator[None]:
    """First Ctrl-C: finish the current image, then stop. Second Ctrl-C or SIGTERM: abandon
    it (KeyboardInterrupt). Finished images are written either way."""

    def on_signal(number: int, frame: object) -> None:
        if number == signal.SIGINT and not stop.is_set():
            stop.set()
            warn("stopping after the current image (Ctrl-C again to abandon it)")
            return
        stop.set()
        raise KeyboardInterrupt

    with handling(on_signal):
        yield


@contextmanager
def flag_on_signals(flag: threading.Event) -> Iterator[None]:
    """Ctrl-C or SIGTERM only set ``flag`` (rank 0 waiting for the others: a signal
    shortens the wait for silent ranks instead of ending rank 0)."""
    with handling(lambda number, frame: flag.set()):
        yield
