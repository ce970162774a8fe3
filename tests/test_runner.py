"""The streaming runner: failures isolated, read-ahead and write-behind overlapping the
model with bounded memory, clean stops, and the manifest's resume decisions."""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time

import pytest
from PIL import Image

from pisa_cli import UpscaleOptions
from pisa_cli.batch.runner import run_jobs
from pisa_cli.fsutil import TEMP_PREFIX
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.io import write_output
from pisa_cli.imaging.manifest import MANIFEST_NAME, Manifest
from pisa_cli.options import BatchOptions, WriteOptions
from tests.builders import noise_image
from tests.fakes import FakeResult

OPTIONS = UpscaleOptions(process_size=32)


class SlowPipeline:
    """Upscales by 4 with a nearest filter, taking ``seconds`` (sleeping, like a GPU)."""

    def __init__(self, seconds: float = 0.0, interrupt_at: int | None = None):
        self.seconds = seconds
        self.interrupt_at = interrupt_at
        self.calls = 0
        self.during_write = 0
        self.writing = threading.Event()

    def upscale_with_info(self, image, options):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        start = time.perf_counter()
        time.sleep(self.seconds)
        if self.writing.is_set():
            self.during_write += 1
        big = image.resize((image.width * 4, image.height * 4), Image.Resampling.NEAREST)
        return FakeResult(big, {"unet": time.perf_counter() - start})


def make_inputs(folder, count, size=(16, 12)):
    folder.mkdir(exist_ok=True)
    jobs = []
    for index in range(count):
        noise_image(*size, seed=index).save(folder / f"img{index:02d}.png")
        jobs.append(Job(folder / f"img{index:02d}.png", folder.parent / "out" / f"{index:02d}.png"))
    return jobs


def leftovers(folder):
    return [p for p in folder.rglob(f"{TEMP_PREFIX}*")] if folder.exists() else []


# --- failures ----------------------------------------------------------------------------


def _corrupt(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)


def _truncated(path):
    noise_image(64, 64, 3).save(path)
    path.write_bytes(path.read_bytes()[:300])


def _empty(path):
    path.write_bytes(b"")


def _not_an_image(path):
    path.write_text("name,value\n")


def _too_many_pixels(path):
    noise_image(200, 200, 4).save(path)  # the run's --max-pixels is 10,000


def _unreadable(path, monkeypatch):
    noise_image(16, 12, 5).save(path)
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real_open = Image.open  # root reads anything: make the refusal the OS would give

    def refusing(target, *args, **kwargs):
        if str(target) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refusing)


BAD_INPUTS = {
    "corrupt": (_corrupt, "corrupt or truncated"),
    "truncated": (_truncated, "corrupt or truncated"),
    "zero-bytes": (_empty, "empty file (0 bytes)"),
    "not-an-image": (_not_an_image, "not an image Pillow can read"),
    "too-many-pixels": (_too_many_pixels, "more than --max-pixels 10,000"),
    "unreadable": (_unreadable, "permission denied (cannot read)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_fails_alone_with_one_line(tmp_path, monkeypatch, case):
    jobs = make_inputs(tmp_path / "in", 3)
    make, reason = BAD_INPUTS[case]
    bad = jobs[1].source
    make(bad, monkeypatch) if make is _unreadable else make(bad)
    batch = BatchOptions(max_pixels=10_000)
    results = list(run_jobs(SlowPipeline(), jobs, OPTIONS, batch))
    assert [r.status for r in results] == ["done", "failed", "done"]
    error = results[1].error
    assert error.startswith(str(bad)) and reason in error and "\n" not in error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00.png", "02.png"]


def test_an_unwritable_output_folder_fails_each_image_alone(tmp_path, monkeypatch):
    jobs = make_inputs(tmp_path / "in", 3)
    locked = tmp_path / "locked"
    locked.mkdir()
    jobs[1] = Job(jobs[1].source, locked / "01.png")
    if os.geteuid() != 0:
        locked.chmod(0o500)
    else:  # root writes anywhere: refuse as the OS would for a read-only folder
        real_mkstemp = tempfile.mkstemp

        def refusing(*args, dir=None, **kwargs):
            if str(dir) == str(locked):
                raise PermissionError(13, "Permission denied", str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refusing)
    results = list(run_jobs(SlowPipeline(), jobs, OPTIONS))
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert (
        results[1].error == f"{locked / '01.png'}: permission denied (output folder not writable)"
    )


def test_a_failing_model_call_fails_alone(tmp_path):
    class Flaky(SlowPipeline):
        def upscale_with_info(self, image, options):
            if self.calls == 1:
                self.calls += 1
                raise RuntimeError("boom")
            return super().upscale_with_info(image, options)

    results = list(run_jobs(Flaky(), make_inputs(tmp_path / "in", 3), OPTIONS))
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert "internal error (RuntimeError: boom)" in results[1].error


# --- streaming ---------------------------------------------------------------------------


def test_reading_and_writing_overlap_the_model_in_bounded_memory(tmp_path, monkeypatch):
    count, model_seconds, write_seconds = 12, 0.04, 0.04
    jobs = make_inputs(tmp_path / "in", count)
    pipeline = SlowPipeline(model_seconds)
    alive, peak, lock = [0], [0], threading.Lock()
    import pisa_cli.batch.runner as runner_module

    real_read = runner_module.read_picture

    def counting_read(*args, **kwargs):
        picture = real_read(*args, **kwargs)
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        return picture

    def slow_save(pixels, path, write, before_replace):
        pipeline.writing.set()
        time.sleep(write_seconds)
        notes = write_output(pixels, path, write, before_replace)
        pipeline.writing.clear()
        with lock:
            alive[0] -= 1
        return notes

    monkeypatch.setattr(runner_module, "read_picture", counting_read)
    batch = BatchOptions(read_ahead=2, write_behind=2)
    start = time.perf_counter()
    results = list(run_jobs(pipeline, jobs, OPTIONS, batch, save=slow_save))
    streamed = time.perf_counter() - start
    assert [r.job for r in results] == jobs and {r.status for r in results} == {"done"}
    assert pipeline.during_write >= count // 2  # the model ran while outputs were written
    # decoded images waiting: read-ahead queue + the reader's hand + the model's + writes
    assert peak[0] <= batch.read_ahead + 1 + 1 + batch.write_behind + 1
    # in turn, the sleeps alone add up to ``sequential``; overlapped, about half of it (no
    # tighter bound: on two busy cores the reads and writes around the sleeps take longer)
    sequential = count * (model_seconds + write_seconds)
    assert streamed < sequential, (streamed, sequential)


def test_depth_zero_runs_everything_in_turn(tmp_path, monkeypatch):
    import pisa_cli.batch.runner as runner_module

    threads = []
    real_read = runner_module.read_picture

    def read(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_read(*args, **kwargs)

    def save(*args):
        threads.append(threading.current_thread().name)
        return write_output(*args)

    monkeypatch.setattr(runner_module, "read_picture", read)
    batch = BatchOptions(read_ahead=0, write_behind=0)
    jobs = make_inputs(tmp_path / "in", 3)
    results = list(run_jobs(SlowPipeline(), jobs, OPTIONS, batch, save=save))
    assert [r.status for r in results] == ["done"] * 3
    assert set(threads) == {threading.current_thread().name} and len(threads) == 6


def test_the_batch_write_options_reach_the_encoder(tmp_path):
    """--quality travels as the batch's WriteOptions, from the runner to Pillow."""
    [job] = make_inputs(tmp_path / "in", 1, size=(32, 32))
    sizes = {}
    for quality in (10, 95):
        output = tmp_path / "out" / f"q{quality}.jpg"
        batch = BatchOptions(write=WriteOptions(format="jpg", quality=quality))
        [result] = run_jobs(SlowPipeline(), [Job(job.source, output)], OPTIONS, batch)
        assert result.status == "done", result.error
        sizes[quality] = output.stat().st_size
    assert sizes[10] < sizes[95] / 2


# --- stopping ----------------------------------------------------------------------------


def test_stop_finishes_the_current_image_and_writes_what_is_done(tmp_path):
    jobs = make_inputs(tmp_path / "in", 8)
    stop = threading.Event()
    pipeline = SlowPipeline(0.02)
    results = []
    for result in run_jobs(pipeline, jobs, OPTIONS, stop=stop, on_start=lambda job: None):
        results.append(result)
        stop.set()  # as the first Ctrl-C does
    assert 1 <= len(results) < len(jobs)
    assert all(r.status == "done" for r in results)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(r.job.output.name for r in results)
    assert not leftovers(tmp_path)


def test_keyboard_interrupt_abandons_the_image_in_the_model(tmp_path):
    jobs = make_inputs(tmp_path / "in", 6)
    results = list(run_jobs(SlowPipeline(0.01, interrupt_at=3), jobs, OPTIONS))
    assert [r.job for r in results] == jobs[:2]  # the third was abandoned, nothing after
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00.png", "01.png"]
    assert not leftovers(tmp_path)


# --- manifest decisions ------------------------------------------------------------------


@pytest.fixture
def written(tmp_path):
    """An output written and recorded under settings {"a": 1}."""
    source = tmp_path / "in.png"
    noise_image(8, 8).save(source)
    output = tmp_path / "out" / "in.png"
    output.parent.mkdir()
    manifest = Manifest(output.parent, {"a": 1})
    from pisa_cli.imaging.modes import Pixels

    write_output(
        Pixels(image=noise_image(32, 32)),
        output,
        WriteOptions(quality=95),
        lambda t: manifest.record(source, output, t),
    )
    return source, output


def decide(source, output, settings, overwrite=False):
    return Manifest(output.parent, settings).decide(source, output, overwrite)


def test_same_settings_and_input_is_up_to_date(written):
    assert decide(*written, {"a": 1}).reason == "up to date"
    assert decide(*written, {"a": 1}, overwrite=True).action == "run"


def test_other_settings_redo(written):
    decision = decide(*written, {"a": 2})
    assert (decision.action, decision.reason) == ("run", "settings changed")


def test_a_changed_input_is_redone(written):
    source, output = written
    os.utime(source, ns=(1, 1))
    assert decide(source, output, {"a": 1}).reason == "input changed"


def test_a_copied_output_with_the_same_bytes_is_still_up_to_date(written):
    source, output = written
    os.utime(output, ns=(5, 5))  # as a copy without -p leaves it
    assert decide(source, output, {"a": 1}).reason == "up to date"


def test_files_pisa_did_not_write_are_kept(written, tmp_path):
    source, output = written
    foreign = output.parent / "mine.png"
    noise_image(8, 8).save(foreign)
    decision = decide(source, foreign, {"a": 1})
    assert decision.action == "skip" and "was not written by pisa" in decision.reason
    noise_image(9, 9).save(output)  # edited after pisa wrote it
    decision = decide(source, output, {"a": 1})
    assert decision.action == "skip" and "changed after pisa wrote it" in decision.reason


def test_a_record_whose_rename_never_happened_redoes_the_output(written):
    """Killed between the manifest's record and the rename: the record describes a file
    that never arrived; the file there is the older one, recorded with older settings."""
    source, output = written
    manifest = Manifest(output.parent, {"a": 2})
    temp = output.parent / "never-renamed.png"
    noise_image(32, 32, seed=9).save(temp)
    manifest.record(source, output, temp)
    temp.unlink()
    decision = decide(source, output, {"a": 2})
    assert (decision.action, decision.reason) == ("run", "settings changed")


def test_a_torn_last_line_is_ignored_and_the_next_starts_clean(written):
    source, output = written
    path = output.parent / MANIFEST_NAME
    with open(path, "a") as handle:
        handle.write('{"output": "x.png", "settings_k')  # a killed append
    manifest = Manifest(output.parent, {"a": 1})
    assert manifest.unreadable_lines == 1
    manifest.record(source, output, output)
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["output"] == "in.png"
    assert Manifest(output.parent, {"a": 1}).unreadable_lines == 1


def test_the_bar_shows_count_rate_time_left_and_the_current_file(tmp_path):
    from pathlib import Path

    from rich.console import Console

    from pisa_cli.batch.runner import JobResult
    from pisa_cli.cli.progress import BarDisplay

    buffer = io.StringIO()
    bar = BarDisplay(Console(file=buffer, force_terminal=True, width=150), total=2)
    first = Job(Path("in/first.png"), Path("out/first.png"))
    with bar.progress:
        bar.started(first)
        time.sleep(0.01)
        bar.finished(JobResult(first, "done", warnings=["only the first frame is upscaled"]))
        bar.started(Job(Path("in/second.png"), Path("out/second.png")))
        bar.progress.refresh()
    text = buffer.getvalue()
    assert "1/2" in text and "img/s" in text and "eta" in text and "in/second.png" in text
    assert "warning" in text and "in/first.png: only the first frame is upscaled" in text


def test_track_displays_any_result_iterator(capsys):
    from pathlib import Path

    from pisa_cli.batch.runner import JobResult
    from pisa_cli.cli.progress import track

    jobs = [Job(Path(f"in/{n}.png"), Path(f"out/{n}.png")) for n in ("a", "b")]
    results = [JobResult(jobs[0], "done"), JobResult(jobs[1], "failed", error="in/b.png: bad")]
    assert list(track(iter(results), 2, [str(j.source) for j in jobs], quiet=False)) == results
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[1/2] done in/a.png -> out/a.png (0.0 s)", "[2/2] failed in/b.png: bad"]
