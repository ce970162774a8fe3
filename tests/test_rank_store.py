"""What goes through the ranks' store is plain JSON, checked on the way in: a value
someone else put there (a pickle, malformed or oversized JSON, the wrong shape) loses
that one rank with one line and runs nothing; a store we start ourselves listens on the
loopback address only."""

from __future__ import annotations

import json
import pathlib
import pickle
import re
import socket
from datetime import timedelta
from pathlib import Path

import pytest

from pisa_cli.batch.distributed import Group, RankEnv

PACKAGE = Path(__file__).resolve().parent.parent / "pisa_cli"


class _RunsCode:
    """Unpickling this creates a file: a stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def store():
    """A store served in this process, as rank 0's is."""
    import torch.distributed as dist

    return dist.TCPStore(
        "127.0.0.1", 0, 1, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )


@pytest.fixture
def intruder(store):
    """Another client of the same store: anyone who can reach its port."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", store.port, 1, False, timeout=timedelta(seconds=10))


@pytest.fixture
def group(store):
    group = Group(RankEnv(0, 2, 0, "torchrun"), store, timeout=30)
    yield group
    group.close()


def test_a_pickle_in_the_store_runs_no_code_and_loses_that_rank(group, intruder, tmp_path):
    marker = tmp_path / "code-ran"
    intruder.set("pisa/report/1", pickle.dumps(_RunsCode(marker)))
    values, lost = group.receive({1: "report/1"})
    assert not marker.exists()
    assert 1 in lost and 1 not in values


HUGE = json.dumps({"results": [], "padding": "x" * 2_000_000})


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"\xff\xfe\x00garbage",  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than any parser's stack
        b'{"a": NaN}',
        b"",
        HUGE.encode(),
    ],
    ids=["syntax", "utf8", "deep", "nan", "empty", "huge"],
)
def test_undecodable_values_lose_that_rank(group, intruder, monkeypatch, raw):
    monkeypatch.setattr("pisa_cli.batch.store.MAX_MESSAGE_BYTES", 1_000_000, raising=False)
    intruder.set("pisa/report/1", raw)
    values, lost = group.receive({1: "report/1"})
    assert 1 in lost and 1 not in values


def _jobs(tmp_path: Path, count: int = 3) -> list:
    from pisa_cli.imaging.discover import Job

    return [Job(tmp_path / f"in{n}.png", tmp_path / "out" / f"in{n}.png") for n in range(count)]


GOOD_RESULT = {
    "job": 0,
    "status": "done",
    "error": "",
    "reason": "new",
    "seconds": 1.5,
    "input_size": [8, 6],
    "output_size": [32, 24],
    "input_mode": "RGB",
    "timings": {"unet": 0.5},
    "notes": [],
    "warnings": [],
}
GOOD_REPORT = {
    "results": [GOOD_RESULT],
    "not_done": 0,
    "interrupted": False,
    "run_seconds": 2.0,
    "failed_to_start": False,
}


def _with(**changes) -> dict:
    return {**GOOD_REPORT, **changes}


def _result(**changes) -> dict:
    return _with(results=[{**GOOD_RESULT, **changes}])


@pytest.mark.parametrize(
    "report",
    [
        [1, 2, 3],
        "a string",
        None,
        {"results": []},  # fields missing
        _with(results="not a list"),
        _with(not_done=-1),
        _with(not_done=10**30),
        _with(interrupted="yes"),
        _with(run_seconds="fast"),
        _with(extra=1),
        _result(job=7),  # not one of the jobs handed to that rank
        _result(job="in0.png"),
        _result(job=True),
        _result(status="exploded"),
        _result(seconds=-1),
        _result(input_size=[8]),
        _result(input_size=[8, "6"]),
        _result(timings={"unet": "slow"}),
        _result(notes=[1, 2]),
        _result(path="/etc/passwd"),
        _with(results=[GOOD_RESULT, GOOD_RESULT]),  # the same job twice
    ],
)
def test_a_report_of_the_wrong_shape_loses_that_rank_with_one_line(
    group, intruder, tmp_path, report
):
    from pisa_cli.batch.ranks import collect_reports

    intruder.set("pisa/report/1", json.dumps(report))
    jobs = [_jobs(tmp_path), _jobs(tmp_path)]
    reports, lost = collect_reports(group, jobs, lambda: False)
    assert set(lost) == {1} and 1 not in reports
    assert "\n" not in lost[1] and "rank 1" in lost[1]


def test_reports_and_shares_survive_the_store(group, intruder, tmp_path):
    from pisa_cli.batch.messages import RankReport, Share
    from pisa_cli.batch.ranks import collect_reports
    from pisa_cli.batch.runner import JobResult

    jobs = _jobs(tmp_path)
    result = JobResult(jobs[2], "failed", "in2.png: bad", "new", 0.25, (3, 4), None, "L")
    sent = RankReport([result], not_done=1, interrupted=True, run_seconds=3.0)
    intruder.set("pisa/report/1", json.dumps(sent.to_plain(jobs)))
    reports, lost = collect_reports(group, [jobs, jobs], lambda: False)
    assert not lost and reports[1] == sent
    share = Share(tuple(jobs), {job: "new" for job in jobs}, {"upscale": {"scale": 4}})
    again = Share.from_plain(json.loads(json.dumps(share.to_plain())), tmp_path / "out")
    assert again == share


@pytest.mark.parametrize(
    "change",
    [
        {"jobs": [["in.png", "/elsewhere/in.png"]], "reasons": ["new"]},  # outside -o
        {"jobs": [["in.png", "out/../../x.png"]], "reasons": ["new"]},
        {"jobs": [["in.png"]], "reasons": ["new"]},
        {"jobs": [["in.png", "out/in.png"]], "reasons": []},
        {"settings": "plain"},
        {"exit_code": "1"},
        {"exit_code": 1000},
    ],
)
def test_a_malformed_share_is_refused(tmp_path, change):
    from pisa_cli.batch.messages import MalformedMessage, Share

    plain = {"jobs": [], "reasons": [], "settings": {}, "exit_code": None, **change}
    plain["jobs"] = [[str(tmp_path / part) for part in job] for job in plain["jobs"]]
    with pytest.raises(MalformedMessage):
        Share.from_plain(plain, tmp_path / "out")


def test_a_bad_heartbeat_or_progress_loses_only_that_rank(group, intruder):
    intruder.set("pisa/beat/1", b"not a counter")
    intruder.set("pisa/progress/1", b'["many", {}, null]')
    assert group.ranks_progress()[1].done == 0
    group.timeout = 0.5
    values, lost = group.receive({1: "report/1"})
    assert 1 in lost and not values


def test_the_package_never_unpickles():
    pattern = re.compile(r"\bpickle\.loads?\b|\bfrom pickle import\b|\bmarshal\.loads?\b")
    found = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


def _listening_addresses(port: int) -> list[str]:
    """Local addresses listening on ``port`` (hex, as /proc/net/tcp* writes them)."""
    addresses = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as table:
            for line in table.read().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":
                    addresses.append(local.rsplit(":", 1)[0])
    return addresses


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_the_store_of_a_loopback_launch_listens_on_loopback_only(monkeypatch):
    """--devices sets MASTER_ADDR=127.0.0.1; torch's TCPStore would still listen on every
    interface (it binds [::] whatever host it is given)."""
    from pisa_cli.batch.distributed import join

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    group = join(RankEnv(0, 1, 0, "torchrun"), "cpu", timeout=20)
    try:
        assert _listening_addresses(port) == ["0100007F"]  # 127.0.0.1, and nothing else
        group.send("probe", {"a": [1, 2]})
        assert group.receive({0: "probe"}) == ({0: {"a": [1, 2]}}, {})
    finally:
        group.close()
