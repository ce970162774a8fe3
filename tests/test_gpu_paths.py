"""The GPU-only branches, on a CPU: torch.cuda and torch.mps answers mocked.

Each test names the issue-20 bug it covers; each failed on the code before its fix.
"""

from __future__ import annotations

import copy
import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pisa_cli.batch.distributed import RankEnv, rank_device
from pisa_cli.core import doctor
from pisa_cli.core.latents import timed
from pisa_cli.core.planning import plan_image
from pisa_cli.core.recovery import release_memory
from pisa_cli.engine import color, memory, vae
from pisa_cli.engine.denoise import predict_eps
from pisa_cli.engine.tiles import plan_tiles
from pisa_cli.models import device as devices
from pisa_cli.models.compiled import CompiledOrEager
from pisa_cli.options import BatchOptions, ModelOptions, UpscaleOptions

GIB = 2**30


def fake_gpus(monkeypatch, capabilities: list[tuple[int, int]]) -> list:
    """torch.cuda as on a machine with GPUs of these compute capabilities; is_bf16_supported
    says yes, as torch's does on every one of them (emulated bf16 counts)."""
    current = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    def index(device=None) -> int:
        if device is None:
            return current[0]
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return current[0] if device.index is None else device.index

    def capability(device=None):
        return capabilities[index(device)]

    def properties(device=None):
        major, minor = capabilities[index(device)]
        return types.SimpleNamespace(
            name=f"GPU sm_{major}{minor}", total_memory=16 * GIB, major=major, minor=minor
        )

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    calls: list = []

    def set_device(device):
        calls.append(("set_device", torch.device(device)))
        current[0] = index(device)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(("sync", d)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    return calls


# --- 3. --dtype auto by the chosen GPU's compute capability -----------------------------
@pytest.mark.parametrize(
    ("capabilities", "device", "expected"),
    [
        ([(7, 5)], "cuda", torch.float16),  # T4 / Turing: bf16 only emulated
        ([(7, 0)], "cuda:0", torch.float16),  # V100
        ([(8, 0)], "cuda", torch.bfloat16),  # A100
        ([(9, 0)], "cuda:0", torch.bfloat16),  # H100
        ([(8, 6), (7, 5)], "cuda:1", torch.float16),  # the chosen device, not the current one
        ([(7, 5), (8, 9)], "cuda:1", torch.bfloat16),
    ],
)
def test_dtype_auto_is_bf16_only_from_compute_capability_8(
    monkeypatch, capabilities, device, expected
):
    fake_gpus(monkeypatch, capabilities)
    assert devices.resolve_dtype("auto", torch.device(device)) == expected
    assert devices.resolve_dtype("bf16", torch.device(device)) == torch.bfloat16  # as asked


def test_doctor_says_what_dtype_auto_picks(monkeypatch):
    fake_gpus(monkeypatch, [(7, 5), (8, 0)])
    lines = {c.name: c.detail for c in doctor._device_checks(ModelOptions(device="cpu"))}
    assert "compute 7.5" in lines["cuda:0"] and "no bf16: auto is fp16" in lines["cuda:0"]
    assert "compute 8.0" in lines["cuda:1"] and "no bf16" not in lines["cuda:1"]


# --- 2. ranks: cuda:{LOCAL_RANK mod visible GPUs}, set once per rank ---------------------
def test_a_rank_seeing_one_gpu_takes_it_and_makes_it_current(monkeypatch):
    calls = fake_gpus(monkeypatch, [(9, 0)])  # srun --gpus-per-task=1: LOCAL_RANK 3, 1 GPU
    device = rank_device("auto", RankEnv(3, 4, 3, "slurm"), torch.cuda.device_count())
    assert device == "cuda:0"
    devices.make_current(torch.device(device))
    assert calls == [("set_device", torch.device("cuda:0"))]
    devices.resolve_device(device)  # exists: no DeviceError


def test_a_rank_seeing_every_gpu_takes_its_local_rank(monkeypatch):
    calls = fake_gpus(monkeypatch, [(9, 0)] * 4)
    device = rank_device("cuda", RankEnv(6, 8, 2, "torchrun"), torch.cuda.device_count())
    devices.make_current(torch.device(device))
    assert device == "cuda:2" and calls == [("set_device", torch.device("cuda:2"))]
    devices.make_current(torch.device("cpu"))  # a CPU rank sets nothing
    assert len(calls) == 1


# --- 11. no process group at all: a launcher's ranks each run their own --shard --------
def test_a_launcher_rank_starts_no_process_group_and_makes_its_gpu_current(monkeypatch):
    import torch.distributed as dist

    from pisa_cli.cli import launch, spec

    calls = fake_gpus(monkeypatch, [(9, 0)] * 2)

    def refuse(*args, **kwargs):
        raise AssertionError("a rank joined a process group")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    run = spec.UpscaleSpec((), Path("out"), ModelOptions(), UpscaleOptions(), BatchOptions())
    run = launch.launch_of(run, torch.cuda.device_count)
    assert (run.shard.index, run.shard.count, run.model.device) == (3, 4, "cuda:1")
    assert calls == [("set_device", torch.device("cuda:1"))]


# --- 5. MPS: its own free-memory figure, its queue synchronised and its cache emptied ---
def fake_mps(monkeypatch, recommended: int, allocated: int) -> list:
    calls: list = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: recommended)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: allocated)
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("sync"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("empty_cache"))
    return calls


def test_mps_free_memory_is_metals_working_set_less_torchs_tensors(monkeypatch):
    fake_mps(monkeypatch, recommended=21 * GIB, allocated=5 * GIB)
    assert devices.free_memory(torch.device("mps")) == 16 * GIB


def test_macos_ram_is_not_a_4_gib_guess(monkeypatch):
    """macOS has no /proc/meminfo: its RAM, the GPU's too, is what MPS says is free."""
    fake_mps(monkeypatch, recommended=48 * GIB, allocated=2 * GIB)
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(devices.sys, "platform", "darwin")
    assert devices.available_ram() == 46 * GIB


def test_stage_timings_and_memory_release_reach_mps(monkeypatch):
    calls = fake_mps(monkeypatch, recommended=8 * GIB, allocated=0)
    timings: dict[str, float] = {}
    with timed(timings, "decode", torch.device("mps")):
        pass
    assert calls == ["sync"] and "decode" in timings
    release_memory()
    assert calls == ["sync", "empty_cache"]


def test_cuda_stage_timings_synchronise_the_stage_device(monkeypatch):
    calls = fake_gpus(monkeypatch, [(9, 0)])
    with timed({}, "unet", torch.device("cuda:0")):
        pass
    assert calls == [("sync", torch.device("cuda:0"))]


# --- 6. tiled-VAE planes live in host RAM: budgeted against host RAM on a GPU -----------
def plan(free: int, host: int | None, size=(1024, 1024), **options):
    options = UpscaleOptions(process_size=512, **options)
    widths = memory.Widths()
    return plan_image(size, options, widths, 2, free, host_free_bytes=host)


def test_tiled_vae_store_follows_host_ram_on_a_gpu():
    # 4096 px output on a 12 GiB GPU: the VAE goes in bands either way.
    on_gpu = plan(12 * GIB, host=64 * GIB)
    assert on_gpu.decoder_tile is not None and on_gpu.store == "ram"  # 64 GiB of RAM: planes fit
    small_host = plan(80 * GIB, host=4 * GIB, size=(1536, 1536))
    assert small_host.decoder_tile is not None and small_host.store == "disk"
    # On the CPU the planes and the bands share one memory, as before.
    assert plan(12 * GIB, host=None).store == "disk"


# --- 12. untiled VAE passes past 2^31 elements -----------------------------------------
def test_vae_goes_in_bands_past_two_to_the_31_elements():
    huge = plan(10_000 * GIB, host=10_000 * GIB)  # 1024 -> 4096: 256 x 4096^2 = 2^32
    assert huge.decoder_tile is not None
    assert huge.encoder_tile is None  # 128 x 4096^2 = 2^31: still within
    wide = plan(10_000 * GIB, host=10_000 * GIB, size=(1200, 1100))  # 4800 x 4400 input
    assert wide.encoder_tile is not None
    under = plan(10_000 * GIB, host=10_000 * GIB, size=(512, 512))  # 2048 px: untiled
    assert under.decoder_tile is None and under.encoder_tile is None
    # An image batch of untiled passes stays within the limit too: 256 x 2048^2 x 8 = 2^33
    assert under.untiled_batch_limit(memory.Widths()) == 2


def test_forced_bands_give_the_untiled_image(pipeline, monkeypatch):
    """The tiny VAE, with the limit lowered to its scale: the same image in bands."""
    latents = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole = vae.decode(pipeline.models.vae, latents)
    widths = pipeline.models.widths
    monkeypatch.setattr(memory, "INDEX_LIMIT", 2 * widths.vae * 96 * 80 - 1)
    options = UpscaleOptions(process_size=64, scale=4)
    forced = plan_image((24, 20), options, widths, 4, 100 * GIB)
    assert forced.decoder_tile is not None
    with torch.inference_mode():
        banded = vae.decode(pipeline.models.vae, latents, tile=forced.decoder_tile)
    assert torch.allclose(whole, banded, atol=2e-5)


# --- 13. --compile: one shape per tile batch, recompiles shown ------------------------
def test_a_compiled_unet_sees_one_batch_shape():
    shapes = []

    def unet(batch, cond, variants, timestep=1):
        shapes.append(tuple(batch.shape))
        return batch.repeat(len(variants), 1, 1, 1) * 2

    latents = torch.randn(2, 4, 40, 40)
    tiles = plan_tiles(40, 40, 16, 4, "stablesr")
    kwargs = {"tile_batch": 4, "variants": ("pix", "pisa")}
    plain = predict_eps(unet, latents, None, tiles, **kwargs)
    count = len(shapes)
    assert len(set(shapes)) == 2  # 2 x 9 tiles by 4: a short last batch
    padded = predict_eps(unet, latents, None, tiles, pad=True, **kwargs)
    assert set(shapes[count:]) == {(4, 4, 16, 16)}
    for variant in plain:
        assert torch.equal(plain[variant], padded[variant])
    untiled = plan_tiles(40, 40, 64, 4, "stablesr")
    predict_eps(unet, torch.randn(3, 4, 40, 40), None, untiled, ("pix",), 2, pad=True)
    assert set(shapes[-2:]) == {(2, 4, 40, 40)}


def test_recompiles_are_logged_and_the_limit_is_a_warning(caplog):
    # torch's own patch: monkeypatch's undo deletes a setting of torch's config module,
    # and every later torch.compile in this process then fails
    with torch._dynamo.config.patch(recompile_limit=3, automatic_dynamic_shapes=False):
        torch._dynamo.reset()
        compiled = CompiledOrEager(lambda x: x * 2 + 1, "UNet", backend="eager")
        with caplog.at_level(logging.DEBUG, logger="pisa_cli.models.compiled"):
            for size in (1, 2, 3, 4, 5):
                assert torch.equal(compiled(torch.ones(size)), torch.full((size,), 3.0))
        torch._dynamo.reset()
    assert torch._dynamo.config.recompile_limit != 3  # put back
    assert compiled.graphs == 3
    assert "graph 2 of the UNet, inputs [(2,)]" in caplog.text
    assert "made 3 graphs of the UNet, torch's recompile limit" in caplog.text


# --- 14. bench timings stop after the device's queue -----------------------------------
def test_bench_clock_stops_after_the_synchronisation(monkeypatch):
    from pisa_cli import bench

    order = []
    monkeypatch.setattr(bench, "synchronize", lambda device: order.append("sync"))
    clock = iter(range(100))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: order.append("clock") or next(clock))
    rows: list = []
    with bench.measured(rows, "s", "c", torch.device("cpu")):
        order.append("work")
    assert order[order.index("work") + 1 :][:2] == ["sync", "clock"]


def test_bench_rows_on_an_accelerator_report_host_memory_too(monkeypatch):
    """The tiled VAE's planes live on the host: a GPU allocator's peak alone misses them."""
    from pisa_cli import bench

    monkeypatch.setattr(bench, "synchronize", lambda device: None)
    rows: list = []
    with bench.measured(rows, "vae-memory", "planes", torch.device("mps")):
        planes = torch.ones(64, 2**20)  # 256 MiB on the host
    del planes
    assert rows[0].figures["host_peak_gib"] > 0.2


# --- 1. the colour fix meets its reference on one device, on a real GPU too ------------
@torch.inference_mode()
def test_tiled_decode_and_colour_fix_on_the_device(pipeline, device):
    model = copy.deepcopy(pipeline.models.vae).to(device)
    latents = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(1))
    image = vae.decode(model, latents.to(device), tile=8)
    assert image.device.type == device.type
    whole = vae.decode(model, latents.to(device))
    assert torch.allclose(image, whole, atol=1e-4)
    source = torch.rand(1, 3, 96, 80, device=device)
    fixed = color.color_fix("adain", (image + 1) / 2, source)
    assert np.isfinite(fixed.cpu().numpy()).all()
