"""Streaming scenario: does the model wait for reading and writing?

A folder of images goes through the tiny random model with a deliberately slow writer: a
pause before each save, as on a slow disk or a network share, of half the model time of
the image being saved (so the writer is slow, but not the bottleneck, however busy the
machine is). Run in turn, the wall time is the model's plus the writer's; streamed
(read-ahead and write-behind threads) it should be close to the model's alone.
``io_hidden`` is the share of the reading and writing time that overlapped the model
(0: none, 1: all).
"""

from __future__ import annotations

import queue
import tempfile
import time
from pathlib import Path

import torch

from pisa_cli.batch.runner import run_jobs
from pisa_cli.bench import Row, measured, scenario
from pisa_cli.bench.upscale import noise_photo
from pisa_cli.core.pipeline import PisaPipeline
from pisa_cli.imaging.discover import discover
from pisa_cli.imaging.io import write_output
from pisa_cli.options import BatchOptions, UpscaleOptions

IMAGES = 32
SIZE = 64
"""Input side: 64 -> 256 pixels, a few tenths of a second on a CPU with the tiny model."""
OPTIONS = UpscaleOptions(process_size=SIZE)
WRITER_PAUSE = 0.5
"""The writer's pause before each save, in images' model time."""
CASES = {"in turn (no threads)": (0, 0), "streamed (2 ahead, 2 behind)": (2, 2)}


class TimedPipeline:
    """The pipeline, queueing each image's model time for the slow writer."""

    def __init__(self, pipeline: PisaPipeline):
        self.pipeline = pipeline
        self.model_seconds: queue.Queue[float] = queue.Queue()

    def upscale_with_info(self, image, options):
        start = time.perf_counter()
        result = self.pipeline.upscale_with_info(image, options)
        self.model_seconds.put(time.perf_counter() - start)
        return result


def slow_writer(model_seconds: queue.Queue, fraction: float = WRITER_PAUSE):
    """write_output after a pause of ``fraction`` of the image's model time (the thread
    sleeps, as it would waiting for a slow disk); images are saved in model order."""

    def save(pixels, path, write, before_replace):
        time.sleep(fraction * model_seconds.get())
        return write_output(pixels, path, write, before_replace)

    return save


@scenario("streaming")
def streaming(device: torch.device, dtype: torch.dtype, images: int = IMAGES) -> list[Row]:
    """32 images, tiny model, slow writer: wall time vs the sum of model time, in turn and
    streamed."""
    from pisa_cli.core.random import random_pipeline

    rows: list[Row] = []
    pipeline = random_pipeline("tiny", device, dtype)  # as `pisa doctor`'s self-test builds it
    pipeline.upscale_with_info(noise_photo(SIZE, 99), OPTIONS)  # warm-up
    with tempfile.TemporaryDirectory(prefix="pisa-bench-streaming-") as folder:
        inputs = Path(folder) / "in"
        inputs.mkdir()
        for index in range(images):
            noise_photo(SIZE, index).save(inputs / f"image{index:03d}.png")
        for number, (case, (ahead, behind)) in enumerate(CASES.items()):
            jobs = discover([inputs], Path(folder) / f"out{number}").jobs
            batch = BatchOptions(read_ahead=ahead, write_behind=behind)
            timed = TimedPipeline(pipeline)
            save = slow_writer(timed.model_seconds)
            with measured(rows, "streaming", case, device) as row:
                results = list(run_jobs(timed, jobs, OPTIONS, batch, save=save))
            _figures(row, results)
    return rows


def _figures(row: Row, results: list) -> None:
    failed = [result.error for result in results if result.status != "done"]
    if failed or not results:
        raise RuntimeError(f"bench image failed: {failed[0] if failed else 'no images'}")
    model = sum(result.model_seconds for result in results)
    read = sum(result.timings.get("read", 0.0) for result in results)
    # compose + write, the writer's pauses included
    write = sum(result.timings.get(k, 0.0) for result in results for k in ("compose", "write"))
    hidden = (model + read + write - row.seconds) / (read + write)
    row.figures.update(
        {
            "model_s": round(model, 2),
            "write_s": round(write, 2),
            "read_s": round(read, 2),
            "wall_over_model": round(row.seconds / model, 2),
            "io_hidden": round(hidden, 2),
            "img_per_s": round(len(results) / row.seconds, 2),
        }
    )
