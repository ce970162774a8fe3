"""`pisa bench gpu`: its CPU face (one line, exit 2), and its checks run on the CPU against
the CPU, the same code the GPU runs, so that a GPU run is never their first run."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from pisa_cli.bench import gpu, gpu_checks
from pisa_cli.cli import app
from pisa_cli.options import TileOptions, UpscaleOptions

CPU = torch.device("cpu")


def test_without_cuda_one_line_and_exit_2(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["bench", "gpu", "--json", str(tmp_path / "gpu.json")])
    assert result.exit_code == 2
    assert result.output.strip() == gpu.NO_CUDA
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_runs_alone():
    result = CliRunner().invoke(app, ["bench", "gpu", "default-128"])
    assert result.exit_code == 2 and "runs alone" in result.output


def test_report_prints_checks_and_exits_1_on_a_failure(monkeypatch, tmp_path):
    """The CUDA face with the proof stubbed: ok/FAIL lines, the table, the JSON, exit 1."""
    import json

    from pisa_cli.bench import Row

    report = gpu.GpuReport(
        [gpu_checks.Check("a", True, "fine"), gpu_checks.Check("b", False, "max diff 9/255")],
        [Row("gpu-folder", "64 x 128->512", 1.0, None, {"images_per_s": 64.0})],
        {"gpu": "stand-in"},
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "prove", lambda *args, **kw: report)
    path = tmp_path / "gpu.json"
    result = CliRunner().invoke(app, ["bench", "gpu", "--json", str(path)])
    assert result.exit_code == 1
    assert "ok    a: fine" in result.output and "FAIL  b: max diff 9/255" in result.output
    assert "images_per_s=64" in result.output
    saved = json.loads(path.read_text())
    assert [c["result"] for c in saved["checks"]] == ["ok", "FAIL"]


@pytest.mark.slow
def test_parity_checks_on_the_cpu():
    checks = gpu_checks.parity_checks(CPU, CPU)
    assert len(checks) == len(gpu_checks.PARITY_CASES) + 1
    assert all(check.ok for check in checks), [c for c in checks if not c.ok]


@pytest.mark.slow
def test_precision_and_redo_checks_on_the_cpu():
    checks = [*gpu_checks.low_precision_checks(CPU), gpu_checks.redo_check(CPU)]
    assert all(check.ok for check in checks), checks
    assert "redone in fp32" in checks[-1].detail


def _stand_in_limit(pipeline, extra: int):
    """The CPU's stand-in for a memory cap: the first UNet call of more than one tile
    raises the error CUDA's allocator raises."""
    forward, raised = pipeline.models.unet.forward, []

    def capped(latents, *args, **kwargs):
        if not raised and latents.shape[0] > 1:
            raised.append(latents.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return forward(latents, *args, **kwargs)

    pipeline.models.unet.forward = capped
    return lambda: setattr(pipeline.models.unet, "forward", forward)


@pytest.mark.slow
def test_oom_check_on_the_cpu():
    tiles = TileOptions(latent_tile=8, latent_overlap=2, tile_batch=4)
    options = UpscaleOptions(process_size=64, color_fix="none", tiles=tiles)
    check = gpu_checks.oom_check(CPU, "tiny", 24, _stand_in_limit, options)
    assert check.ok, check
    assert "out of memory" in check.detail
    assert gpu_checks.oom_check(CPU, "tiny", 24).ok is None  # no cap without a stand-in


@pytest.mark.slow
def test_first_run_load_check_on_the_cpu(tiny_base, pisa_pkl):
    check, row = gpu.load_figure(CPU, tiny_base, pisa_pkl)
    assert check.ok, check
    assert row.figures["weights_gib"] >= 0


@pytest.mark.slow
def test_compile_check_on_the_cpu(monkeypatch):
    """The check's path with dynamo capturing our modules for real; the code generation is
    the eager backend's (inductor's CPU C++ took 13 s of this test and is not what a GPU
    runs: there it is Triton, which the GPU run checks)."""
    lookup = torch._dynamo.lookup_backend
    monkeypatch.setattr(torch._dynamo, "lookup_backend", lambda name: lookup("eager"))
    check = gpu_checks.compile_check(CPU)
    assert check.ok, check


@pytest.mark.slow
def test_prove_with_figures_runs_on_tiny_models(monkeypatch, tiny_base, pisa_pkl):
    """Every figure of the GPU run, on the tiny architecture and 4 images: the code the
    GPU runs first, run here first (the checks are tested above)."""
    from pisa_cli.bench import perf
    from pisa_cli.core import random

    build = random.random_pipeline
    monkeypatch.setattr(
        random, "random_pipeline", lambda arch, *args, **kw: build("tiny", *args, **kw)
    )
    monkeypatch.setattr(gpu, "all_checks", lambda device, progress: [])
    monkeypatch.setattr(gpu, "_random_files", lambda folder, progress: (tiny_base, pisa_pkl))
    monkeypatch.setattr(gpu, "FOLDER_IMAGES", 4)
    monkeypatch.setattr(perf, "FOLDER_IMAGES", 4)
    monkeypatch.setattr(perf, "matmul_peak", lambda dtype, device: 1e12)
    from pisa_cli.bench import sweep, upscale

    run_folder = upscale.run_folder

    def smaller(rows, name, case, pipeline, sizes, *args, **kw):  # 32 px stands in for 128+
        return run_folder(rows, name, case, pipeline, [32] * len(sizes), *args, **kw)

    monkeypatch.setattr(upscale, "run_folder", smaller)
    monkeypatch.setattr(perf, "run_folder", smaller)
    monkeypatch.setattr(sweep, "GRID", "pix=0:1:1 sem=0:1:1")
    monkeypatch.setattr(sweep, "SIZE", 32)
    steps: list[str] = []
    report = gpu.prove(CPU, None, steps.append)
    assert steps == ["first-run load", "figures", "official PiSA-SR script"]
    assert [c.name for c in report.checks] == ["first-run load peak"]
    scenarios = [row.scenario for row in report.rows]
    for name in ("gpu-load", "gpu-folder", "adjustable-128", "upscale-512-2048", "sweep-5x5"):
        assert name in scenarios
    folder = next(row for row in report.rows if row.scenario == "gpu-folder")
    assert folder.figures["images_per_s"] > 0 and "gpu_idle_s" in folder.figures
    assert "no --official DIR" in report.rows[-1].figures["skipped"]
    import json

    json.dumps(report.as_json(), default=str)


def test_official_script_skipped_with_the_reason(tmp_path):
    row = gpu.official_figure(None, tmp_path, tmp_path / "w.pkl", CPU)
    assert "no --official DIR" in row.figures["skipped"]
    row = gpu.official_figure(tmp_path, tmp_path, tmp_path / "w.pkl", CPU)
    assert "ModuleNotFoundError" in row.figures["skipped"] and "pisasr" in row.figures["skipped"]
