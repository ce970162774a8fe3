"""--compile falls back to eager execution wherever torch.compile fails."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pisa_cli.models import compiled
from pisa_cli.models.compiled import CompiledOrEager
from pisa_cli.options import UpscaleOptions
from tests.builders import noise_image


def test_compiler_missing_at_build_time(monkeypatch, caplog):
    def no_compiler(function, **options):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    with caplog.at_level(logging.WARNING):
        wrapped = CompiledOrEager(lambda x: x + 1, "UNet")
    assert wrapped(1) == 2
    assert "torch.compile of the UNet failed (RuntimeError: no C++ compiler found)" in caplog.text


def test_compiled_call_failing_falls_back_once(monkeypatch, caplog):
    calls = []

    def broken_compile(function, **options):
        def run(*args):
            calls.append("compiled")
            raise NotImplementedError("operator not supported by the backend")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapped = CompiledOrEager(lambda x: x * 2, "VAE decoder")
    with caplog.at_level(logging.WARNING):
        assert [wrapped(3), wrapped(4)] == [6, 8]
    assert calls == ["compiled"]  # not tried again after the first failure
    assert caplog.text.count("torch.compile of the VAE decoder failed") == 1


def test_out_of_memory_is_not_taken_for_a_compiler_failure(monkeypatch):
    def oom_compile(function, **options):
        def run(*args):
            raise MemoryError

        return run

    monkeypatch.setattr(torch, "compile", oom_compile)
    wrapped = CompiledOrEager(lambda x: x, "UNet")
    with pytest.raises(MemoryError):
        wrapped(1)
    assert wrapped.compiled is not None


def test_pipeline_with_compile_gives_the_same_image(tiny_base, pisa_pkl, monkeypatch):
    from pisa_cli import load_pipeline

    def failing_compile(function, **options):
        def run(*args, **kwargs):
            raise RuntimeError("inductor backend failed")

        return run

    monkeypatch.setattr(compiled.torch, "compile", failing_compile)
    plain = load_pipeline(weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu")
    from pisa_cli.options import ModelOptions

    model = ModelOptions(
        weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu", compile=True
    )
    with_compile = load_pipeline(model)
    image, options = noise_image(24, 20, 1), UpscaleOptions(process_size=64)
    assert np.array_equal(
        np.asarray(plain.upscale(image, options)), np.asarray(with_compile.upscale(image, options))
    )
    assert with_compile.models.unet.forward.compiled is None  # it fell back
