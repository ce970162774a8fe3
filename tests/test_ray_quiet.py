"""Ray's own lines never reach our display: the C++ core's start-up line on descriptor 2
and the driver's error listener ("(raylet) A worker died ...") go to our debug log. No Ray
is started: a stand-in takes ray.init's place, and the listener's printer is called as the
listener calls it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import pytest

from pisa_cli.batch.ray_run import RayTarget, connect

CORE_LINE = b"[2026-01-01 00:00:00,000 I 1 1] logging.cc:303: Set ray log level to 3\n"


@contextlib.contextmanager
def debug_lines() -> Iterator[list[str]]:
    """What ray_run logs at debug level (its own handler: an earlier CLI run in the session
    may have left the pisa_cli logger with a handler on a closed stream)."""
    logger = logging.getLogger("pisa_cli.batch.ray_run")
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


class StartingRay:
    """ray.init writing on descriptor 2 as Ray's C++ core does."""

    def __init__(self):
        self.started = False

    def is_initialized(self) -> bool:
        return self.started

    def init(self, **options) -> None:
        os.write(2, CORE_LINE)
        self.started = True
        self.options = options


def test_the_core_line_written_while_ray_starts_goes_to_the_debug_log(capfd, monkeypatch):
    monkeypatch.setenv("RAY_BACKEND_LOG_LEVEL", "fatal")  # connect sets it when missing
    with debug_lines() as lines:
        assert connect(StartingRay(), RayTarget("local", ("cpu", "cpu"))) is True
    assert capfd.readouterr().err == ""
    assert any("logging.cc:303" in line for line in lines)
    ray = StartingRay()
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    connect(ray, RayTarget("local"))  # a new instance, not one that `ray start` left running
    assert ray.options["address"] == "local"
    assert os.environ["RAY_worker_niceness"] == "0"  # noqa: SIM112 (Ray spells it so)
    os.write(2, b"after\n")  # descriptor 2 is back
    assert capfd.readouterr().err == "after\n"


def test_the_raylet_lines_of_the_error_listener_go_to_the_debug_log(capsys):
    worker = pytest.importorskip("ray._private.worker", reason="the ray extra is not installed")
    running = StartingRay()
    running.started = True  # a Ray already running: used as it is
    with debug_lines() as lines:
        assert connect(running, RayTarget()) is False
        # what listen_error_messages calls for each cluster event (a global of its module)
        event = {"lines": ["A worker died or was killed while executing a task"], "pid": "raylet"}
        worker.print_to_stdstream({**event, "is_err": False}, ignore_prefix=False)
    assert "worker died" not in capsys.readouterr().out
    assert "ray: A worker died or was killed while executing a task" in lines
