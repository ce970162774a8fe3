"""Streaming scenario: does the model wait for reading and writing?

A folder of images goes through the tiny random model with a deliberately slow writer (a
pause before each save, as on a slow disk or network share, as long as one image's model
time). Run in turn, the wall time is the model's plus the writer's; streamed (read-ahead
and write-behind threads) it should be close to the model's alone.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from pisa_cli.bench import Row, measured, scenario
from pisa_cli.bench.upscale import noise_photo
from pisa_cli.imaging.discover import discover
from pisa_cli.imaging.io import write_output
from pisa_cli.options import BatchOptions, UpscaleOptions
from pisa_cli.pipeline import PisaPipeline
from pisa_cli.runner import run_jobs

IMAGES = 32
SIZE = 64
"""Input side: 64 -> 256 pixels, a few tenths of a second on a CPU with the tiny model."""
OPTIONS = UpscaleOptions(process_size=SIZE)
CASES = {"in turn (no threads)": (0, 0), "streamed (2 ahead, 2 behind)": (2, 2)}


def tiny_pipeline(device: torch.device, dtype: torch.dtype) -> PisaPipeline:
    """The tiny random model (as `pisa doctor`'s self-test builds it)."""
    from transformers import CLIPTokenizer

    from pisa_cli.models.synthetic import (
        build_random_base,
        config_dir,
        random_checkpoint,
        write_tokenizer,
    )
    from pisa_cli.models.text import PromptEncoder
    from pisa_cli.pipeline import build_pipeline

    parts = build_random_base("tiny", seed=0)
    with tempfile.TemporaryDirectory(prefix="pisa-bench-tokenizer-") as folder:
        write_tokenizer(Path(folder), config_dir("tiny"))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    prompts = PromptEncoder(lambda: tokenizer, lambda: parts.text_encoder)  # type: ignore[arg-type,return-value]
    checkpoint = random_checkpoint(parts.unet, seed=1)
    return build_pipeline(
        parts.unet, parts.vae, prompts, parts.scheduler, checkpoint, device, dtype
    )


def slow_writer(delay: float):
    """write_output after a pause of ``delay`` seconds (the thread sleeps, like slow I/O)."""

    def save(pixels, path, quality, before_replace):
        time.sleep(delay)
        return write_output(pixels, path, quality, before_replace)

    return save


@scenario("streaming")
def streaming(device: torch.device, dtype: torch.dtype, images: int = IMAGES) -> list[Row]:
    """32 images, tiny model, slow writer: wall time vs the sum of model time."""
    rows: list[Row] = []
    pipeline = tiny_pipeline(device, dtype)
    with tempfile.TemporaryDirectory(prefix="pisa-bench-streaming-") as folder:
        inputs = Path(folder) / "in"
        inputs.mkdir()
        for index in range(images):
            noise_photo(SIZE, index).save(inputs / f"image{index:03d}.png")
        delay = _model_seconds(pipeline)
        for number, (case, (ahead, behind)) in enumerate(CASES.items()):
            jobs = discover([inputs], Path(folder) / f"out{number}").jobs
            batch = BatchOptions(read_ahead=ahead, write_behind=behind)
            with measured(rows, "streaming", case, device) as row:
                results = list(run_jobs(pipeline, jobs, OPTIONS, batch, save=slow_writer(delay)))
            _figures(row, results, delay)
    return rows


def _model_seconds(pipeline: PisaPipeline, runs: int = 5) -> float:
    """One image's model time: the median of a few runs after a first (warm-up) one."""
    image = noise_photo(SIZE, 99)
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        pipeline.upscale_with_info(image, OPTIONS)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _figures(row: Row, results: list, delay: float) -> None:
    failed = [result.error for result in results if result.status != "done"]
    if failed or not results:
        raise RuntimeError(f"bench image failed: {failed[0] if failed else 'no images'}")
    model = sum(result.model_seconds for result in results)
    read = sum(result.timings.get("read", 0.0) for result in results)
    write = sum(result.timings.get(k, 0.0) for result in results for k in ("compose", "write"))
    row.figures.update(
        {
            "model_s": round(model, 2),
            "write_s": round(write + delay * len(results), 2),
            "read_s": round(read, 2),
            "writer_pause_s": round(delay, 3),
            "wall_over_model": round(row.seconds / model, 2),
            "img_per_s": round(len(results) / row.seconds, 2),
        }
    )
