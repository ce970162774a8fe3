"""Images batched across model calls (--image-batch): the same outputs as one by one, a bad
image never fails its batch-mates, out of memory halves the batch, and the runner groups
images of one shape in a bounded window without changing the order of results."""

from __future__ import annotations

import csv

import numpy as np
import png
import pytest
import torch
from PIL import Image

from pisa_cli.batch.runner import LOOK_AHEAD_BATCHES, run_jobs
from pisa_cli.core.random import random_pipeline
from pisa_cli.engine import vae
from pisa_cli.imaging.discover import discover
from pisa_cli.options import BatchOptions, SecondPassOptions, TileOptions, UpscaleOptions
from tests.builders import noise_image, ramp16, save_png16
from tests.fakes import FakePipeline, run_on

OPTIONS = UpscaleOptions(process_size=64)
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.fixture(
    scope="module",
    params=[pytest.param(torch.float32, marks=pytest.mark.slow), torch.bfloat16],
    ids=["fp32", "bf16"],
)
def tiny(request):
    """The tiny random model; fp32's tests are in the full suite only (bf16's bit-for-bit
    checks cover the mechanism in the fast selection)."""
    return random_pipeline("tiny", torch.device("cpu"), request.param)


def levels(path) -> np.ndarray:
    """Every sample of a PNG in 8-bit levels (a 16-bit one's divided by 257)."""
    _width, _height, rows, info = png.Reader(filename=str(path)).asDirect()
    samples = np.vstack([np.asarray(row, dtype=np.float64) for row in rows])
    return samples / 257 if info["bitdepth"] == 16 else samples


def mixed_folder(folder):
    """Same and different sizes, alpha, grey, 16 bits, an unreadable file in the middle."""
    folder.mkdir()
    noise_image(24, 20, 1).save(folder / "a.png")
    noise_image(24, 20, 2).convert("RGBA").save(folder / "b.png")
    noise_image(24, 20, 3).convert("L").save(folder / "c.png")
    save_png16(ramp16(24, 20, 3, seed=4), folder / "d.png")
    (folder / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    noise_image(23, 20, 6).save(folder / "f.png")  # padded to the same model input as a
    noise_image(40, 32, 7).save(folder / "g.png")
    noise_image(24, 20, 8).save(folder / "h.png")


def upscale_folder(pipeline, folder, out, image_batch, options=OPTIONS):
    jobs = discover([folder], out).jobs
    out.mkdir()
    batch = BatchOptions(image_batch=image_batch, read_ahead=0, write_behind=0)
    return list(run_jobs(pipeline, jobs, options, batch))


@pytest.mark.parametrize("color_fix", ["adain", "none"])
def test_a_mixed_folder_in_batches_gives_the_one_by_one_outputs(tiny, tmp_path, color_fix):
    mixed_folder(tmp_path / "in")
    options = UpscaleOptions(process_size=64, color_fix=color_fix)
    alone = upscale_folder(tiny, tmp_path / "in", tmp_path / "one", 1, options)
    batched = upscale_folder(tiny, tmp_path / "in", tmp_path / "four", 4, options)
    names = [r.job.source.name for r in batched]
    assert names == [r.job.source.name for r in alone] == [f"{c}.png" for c in "abcdefgh"]
    assert [r.status for r in batched] == ["done"] * 4 + ["failed"] + ["done"] * 3
    assert batched[4].error == alone[4].error
    # a b c d share calls; f (one pixel narrower, the same padded input) waits for h
    assert [r.batch for r in batched] == [4, 4, 4, 4, 1, 2, 1, 2]
    worst = 0
    for one, four in zip(alone, batched, strict=True):
        if one.status == "done":
            ours, theirs = levels(four.job.output), levels(one.job.output)
            assert ours.shape == theirs.shape
            worst = max(worst, float(np.abs(ours - theirs).max()))
    if tiny.models.dtype == torch.bfloat16:
        # on a CPU in bf16 every sample runs alone in every model (their kernels round
        # with the batch size): bit for bit
        assert worst == 0
    else:
        # fp32 kernels block by batch size: float noise that can flip an 8-bit level, which
        # adain stretches by the contrast ratio of input and output (about 2 on the tiny
        # random model, about 1 on real weights; see helpers.assert_close)
        assert worst <= (1 if color_fix == "none" else 3), worst


def test_vae_sample_noise_is_each_images_own_in_a_batch(tiny):
    options = UpscaleOptions(process_size=64, vae_sample=True, seed=5)
    images = [noise_image(24, 20, seed) for seed in range(3)]
    batched = tiny.upscale_many(images, options, 3)
    for image, result in zip(images, batched, strict=True):
        alone = np.asarray(tiny.upscale(image, options), dtype=int)
        assert np.abs(np.asarray(result.image, dtype=int) - alone).max() <= (
            0 if tiny.models.dtype == torch.bfloat16 else 3
        )
        assert result.batch == 3


def test_tiles_of_several_images_share_unet_calls(tiny):
    # latent 12x10 in 8x8 tiles, overlap 4: 4 tiles an image; 3 per call
    tiles = TileOptions(latent_tile=8, latent_overlap=4, tile_batch=3)
    options = UpscaleOptions(process_size=64, tiles=tiles)
    images = [noise_image(24, 20, seed) for seed in range(2)]
    assert len(tiny.plan((24, 20), options).unet.tiles) == 4
    before = tiny.models.unet_calls
    results = tiny.upscale_many(images, options, 2)
    assert tiny.models.unet_calls - before == 3  # 8 tiles, 3 per call; alone: 2 calls each
    bar = 0 if tiny.models.dtype == torch.bfloat16 else 3
    for image, result in zip(images, results, strict=True):
        alone = np.asarray(tiny.upscale(image, options), dtype=int)
        assert np.abs(np.asarray(result.image, dtype=int) - alone).max() <= bar


@pytest.mark.slow
def test_the_second_pass_runs_in_batches_too():
    pipe = random_pipeline("tiny", torch.device("cpu"), torch.bfloat16)
    options = UpscaleOptions(process_size=64, second_pass=SecondPassOptions(kind="pisa"))
    images = [noise_image(24, 20, seed) for seed in range(3)]
    calls = pipe.models.unet_calls
    results = pipe.upscale_many(images, options, 3)
    assert pipe.models.unet_calls - calls == 2  # one call a pass for the three images
    for image, result in zip(images, results, strict=True):
        assert result.second_plan is not None and result.image.size == (192, 160)
        assert np.array_equal(np.asarray(result.image), np.asarray(pipe.upscale(image, options)))


# --- isolation and memory ------------------------------------------------------------------


def test_a_bad_image_fails_alone_and_its_batch_mates_come_out_as_alone(monkeypatch):
    pipe = random_pipeline("tiny", torch.device("cpu"), torch.bfloat16)
    encoder = pipe.models.vae.encoder.forward

    def refuse_black(x):  # the model fails on one image's pixels
        if bool((x.flatten(1).amax(dim=1) <= -1).any()):
            raise RuntimeError("the encoder refuses a black image")
        return encoder(x)

    monkeypatch.setattr(pipe.models.vae.encoder, "forward", refuse_black)
    black = Image.new("RGB", (24, 20))
    images = [noise_image(24, 20, 1), black, noise_image(24, 20, 2)]
    results = pipe.upscale_many(images, OPTIONS, 3)
    assert isinstance(results[1], RuntimeError) and "black" in str(results[1])
    for image, result in zip(images[::2], results[::2], strict=True):
        assert result.batch == 1  # it was run again alone
        assert np.array_equal(np.asarray(result.image), np.asarray(pipe.upscale(image, OPTIONS)))


@pytest.mark.slow
def test_out_of_memory_halves_the_image_batch_then_the_tile_batch_then_the_tile(monkeypatch):
    pipe = random_pipeline("tiny", torch.device("cpu"), torch.float32)
    tiles = TileOptions(latent_tile=16, latent_overlap=4, tile_batch=2)
    options = UpscaleOptions(process_size=64, tiles=tiles)
    predict = pipe.models.predict
    seen = []

    def tight(latents, cond, variants, plan, per_call, timestep):
        seen.append((latents.shape[0], per_call, plan.tile_size))
        if latents.shape[0] > 1 or per_call > 1 or plan.tile_size[0] > 8:
            raise RuntimeError(OOM)
        return predict(latents, cond, variants, plan, per_call, timestep)

    monkeypatch.setattr(pipe.models, "predict", tight)
    images = [noise_image(40, 32, seed) for seed in range(2)]  # latent 20x16
    results = pipe.upscale_many(images, options, 2)
    assert seen[:4] == [(2, 2, (16, 16)), (1, 2, (16, 16)), (1, 1, (16, 16)), (1, 1, (8, 8))]
    notes = results[0].notes
    assert notes[0] == "out of memory with 2 images per call; 1 from now on"
    assert notes[1].endswith("at tile 16x16, 2 per call; retried at tile 16x16, 1 per call")
    assert notes[2].endswith("retried at tile 8x8, 1 per call")
    assert all(result.image.size == (160, 128) for result in results)
    assert pipe.batcher.limits == {(160, 128): 1}
    assert pipe.batching(images[0], options, 4)[1] == 1  # the next batches start at 1
    assert pipe.batching(noise_image(24, 20, 1), options, 4)[1] == 4  # other sizes do not


def test_a_failed_batch_is_released_before_its_images_run_again(monkeypatch):
    import gc
    import weakref

    pipe = random_pipeline("tiny", torch.device("cpu"), torch.bfloat16)
    predict, held = pipe.models.predict, []

    def tight(latents, *args):
        if latents.shape[0] > 1:
            held.append(weakref.ref(latents))  # the batch's z_L, made by the batched encode
            raise RuntimeError(OOM)
        gc.collect()
        assert all(ref() is None for ref in held), "the failed batch is still in memory"
        return predict(latents, *args)

    monkeypatch.setattr(pipe.models, "predict", tight)
    results = pipe.upscale_many([noise_image(24, 20, seed) for seed in range(2)], OPTIONS, 2)
    assert held and all(result.image.size == (96, 80) for result in results)


def test_an_overflow_in_a_batch_runs_its_images_alone_with_the_fp32_redo(monkeypatch):
    pipe = random_pipeline("tiny", torch.device("cpu"), torch.bfloat16)
    images = [noise_image(24, 20, seed) for seed in range(2)]
    expected = [np.asarray(pipe.upscale(image, OPTIONS)) for image in images]
    decode = pipe.models.decode

    def overflowing(latents, *args):  # bf16 overflows for the batch (and the first image)
        out = decode(latents, *args)
        if latents.shape[0] > 1 or (pipe.models.vae.dtype == torch.bfloat16 and latents.sum() > 0):
            out = out.clone()
            out.view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(pipe.models, "decode", overflowing)
    first = np.asarray(pipe.upscale_with_info(images[0], OPTIONS).image)  # alone, redone
    results = pipe.upscale_many(images, OPTIONS, 2)
    for result, alone in zip(results, (first, expected[1]), strict=True):
        assert result.batch == 1
        assert np.array_equal(np.asarray(result.image), alone)


def test_an_error_planning_one_image_fails_only_that_image(monkeypatch):
    pipe = random_pipeline("tiny", torch.device("cpu"), torch.bfloat16)
    plan = pipe.plan

    def picky(size, *args):
        if size == (25, 20):
            raise RuntimeError("no plan for this one")
        return plan(size, *args)

    monkeypatch.setattr(pipe, "plan", picky)
    images = [noise_image(24, 20, 1), noise_image(25, 20, 2), noise_image(24, 20, 3)]
    results = pipe.upscale_many(images, OPTIONS, 3)
    assert isinstance(results[1], RuntimeError)
    assert [r.batch for r in results[::2]] == [2, 2]


def test_bf16_vae_on_a_cpu_runs_samples_one_by_one():
    pipe = random_pipeline("tiny", torch.device("cpu"), torch.bfloat16)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    latents = vae.encode(pipe.models.vae, images)
    alone = torch.cat([vae.encode(pipe.models.vae, images[i : i + 1]) for i in range(3)])
    assert torch.equal(latents, alone)
    decoded = vae.decode(pipe.models.vae, latents)
    assert torch.equal(decoded, torch.cat([vae.decode(pipe.models.vae, z[None]) for z in latents]))
    assert not vae.one_by_one(images.float())  # fp32 keeps its batch


def test_auto_is_one_on_a_cpu_and_what_memory_holds_on_an_accelerator(monkeypatch):
    from pisa_cli.core.batching import AUTO_IMAGE_BATCH

    pipe = random_pipeline("tiny", torch.device("cpu"), torch.float32)
    image = noise_image(24, 20, 1)
    assert pipe.batching(image, OPTIONS, None)[1] == 1
    assert pipe.batching(image, OPTIONS, 5)[1] == 5
    monkeypatch.setattr(pipe.models, "device", torch.device("meta"))
    plan = pipe.plan(image.size, OPTIONS)
    fit = int(plan.free_bytes * 0.6 // plan.peak_bytes)
    assert pipe.batching(image, OPTIONS, None)[1] == min(AUTO_IMAGE_BATCH, fit) > 1
    huge = UpscaleOptions(process_size=64, tiles=TileOptions(vae_encoder_tile=64))
    big = noise_image(40, 32, 1)  # 160x128 model input, encoded in bands: alone
    assert pipe.batching(big, huge, 8)[1] == 1


# --- the runner's window ---------------------------------------------------------------------


def folder_of(tmp_path, sizes):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, size in enumerate(sizes):
        noise_image(*size, seed=index).save(folder / f"img{index:02d}.png")
    return discover([folder], tmp_path / "out").jobs


def test_images_of_one_size_are_grouped_and_results_keep_their_order(tmp_path):
    sizes = [(16, 12), (20, 12), (16, 12), (16, 12), (20, 12), (16, 12), (8, 8)]
    jobs = folder_of(tmp_path, sizes)
    fake = FakePipeline()
    results = list(run_jobs(fake, jobs, OPTIONS, BatchOptions(image_batch=3)))
    assert [r.job for r in results] == jobs
    assert [r.status for r in results] == ["done"] * len(sizes)
    # 16x12: 0 2 3 fill a batch of 3; at the end the oldest waiting goes first (1 and 4),
    # then 5 alone, then 6 alone
    assert fake.batches == [3, 2]
    assert [r.batch for r in results] == [3, 2, 3, 3, 2, 1, 1]
    for result, size in zip(results, sizes, strict=True):
        assert Image.open(result.job.output).size == (size[0] * 4, size[1] * 4)


def test_the_window_is_bounded_and_streams(tmp_path, monkeypatch):
    # every image a different size: no batch ever fills, and the window lets each go when
    # LOOK_AHEAD_BATCHES batches wait
    count, size = 20, 2
    jobs = folder_of(tmp_path, [(8 + index, 8) for index in range(count)])
    import pisa_cli.batch.runner as runner_module

    read, in_model = [0], []
    real_read = runner_module.read_picture

    def counting_read(*args, **kwargs):
        read[0] += 1
        return real_read(*args, **kwargs)

    monkeypatch.setattr(runner_module, "read_picture", counting_read)
    batch = BatchOptions(image_batch=size, read_ahead=0, write_behind=0)
    yielded = []
    for result in run_jobs(FakePipeline(), jobs, OPTIONS, batch, on_start=in_model.append):
        yielded.append((result.job, read[0], len(in_model)))
    assert [job for job, _, _ in yielded] == jobs
    assert in_model == jobs  # the oldest first, each alone
    window = LOOK_AHEAD_BATCHES * size
    for index, (_job, reads, _started) in enumerate(yielded[: count - window]):
        assert reads <= index + window, (index, reads)  # never the whole folder ahead


def test_stop_ends_the_run_after_the_batch_in_the_model(tmp_path):
    import threading

    jobs = folder_of(tmp_path, [(16, 12)] * 8)
    stop = threading.Event()
    fake = FakePipeline()
    batch = BatchOptions(image_batch=3, read_ahead=0, write_behind=0)
    results = []
    for result in run_jobs(fake, jobs, OPTIONS, batch, stop=stop):
        results.append(result)
        stop.set()
    assert len(results) == 3 and fake.batches == [3]
    assert all(r.status == "done" and r.job.output.exists() for r in results)
    assert not any(job.output.exists() for job in jobs[3:])


def test_a_failing_image_in_a_fake_batch_fails_alone(tmp_path):
    class Picky(FakePipeline):
        def upscale_with_info(self, image, options):
            if image.size == (16, 12) and self.calls == 1:
                self.calls += 1
                raise RuntimeError("boom")
            return super().upscale_with_info(image, options)

    jobs = folder_of(tmp_path, [(16, 12)] * 3)
    results = list(run_jobs(Picky(), jobs, OPTIONS, BatchOptions(image_batch=3)))
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert "internal error (RuntimeError: boom)" in results[1].error
    assert str(jobs[1].source) in results[1].error


def test_a_batch_call_that_raises_fails_its_images_and_the_run_goes_on(tmp_path):
    class Broken(FakePipeline):
        def upscale_many(self, images, options, requested=None):
            if not self.batches:
                self.batches.append(len(images))
                raise RuntimeError("the batch call broke")
            return super().upscale_many(images, options, requested)

    jobs = folder_of(tmp_path, [(16, 12)] * 4)
    results = list(run_jobs(Broken(), jobs, OPTIONS, BatchOptions(image_batch=2)))
    assert [r.status for r in results] == ["failed", "failed", "done", "done"]
    assert all(str(r.job.source) in r.error for r in results[:2])


def test_image_batch_reaches_the_model_and_the_report_and_not_the_manifest(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(5):
        noise_image(16, 12, index).save(photos / f"p{index}.png")
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"fake weights")
    model = ["--weights", weights, "--base-model", "fake-base", "--device", "cpu"]
    out, report = tmp_path / "out", tmp_path / "report.csv"
    fake = FakePipeline()
    result = run_on(fake, "upscale", photos, "-o", out, *model, "--image-batch", "2",
                    "--report", report)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert fake.batches == [2, 2]  # and the fifth image alone
    rows = list(csv.DictReader(report.open()))
    assert [row["batch"] for row in rows] == ["2", "2", "2", "2", "1"]
    # outputs do not depend on the batch: a rerun with another one skips everything
    again = run_on(None, "upscale", photos, "-o", out, *model, "--image-batch", "auto")
    assert again.exit_code == 0 and "5 skipped" in again.output, again.output


def test_the_last_batches_report_as_they_finish(tmp_path):
    jobs = folder_of(tmp_path, [(16, 12), (20, 12), (16, 12), (24, 12)])
    events = []
    batch = BatchOptions(image_batch=3, read_ahead=0, write_behind=0)
    started = lambda job: events.append(("start", job.source.name))  # noqa: E731
    for result in run_jobs(FakePipeline(), jobs, OPTIONS, batch, on_start=started):
        events.append(("done", result.job.source.name))
    # the folder ends before any batch fills: the oldest image's batch goes first
    assert events == [
        ("start", "img00.png"),
        ("start", "img02.png"),
        ("done", "img00.png"),
        ("start", "img01.png"),
        ("done", "img01.png"),
        ("done", "img02.png"),
        ("start", "img03.png"),
        ("done", "img03.png"),
    ]


def test_a_pipeline_and_its_batcher_do_not_hold_each_other():
    """A pipeline let go is freed at once (no cycle through its batcher for gc to find),
    while what its batches learned stays with it."""
    import gc
    import weakref

    from pisa_cli.core.batching import BatchedPipeline

    pipe = random_pipeline("tiny", torch.device("cpu"), torch.bfloat16)
    assert isinstance(pipe, BatchedPipeline)  # all the batcher asks of it, by the Protocol
    pipe.batcher.limits[(96, 80)] = 1  # as an image batch out of memory leaves it
    assert pipe.batcher.limits == {(96, 80): 1}  # a new batcher, the pipeline's memory
    ref = weakref.ref(pipe)
    gc.disable()
    try:
        del pipe
        assert ref() is None, "the pipeline is kept alive by a reference cycle"
    finally:
        gc.enable()
