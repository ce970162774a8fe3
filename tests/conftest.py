"""Fixtures: a tiny random SD-2.1-shaped base model in the diffusers folder layout, and a
PiSA-SR checkpoint written in the official pickle layout by peft itself.

Nothing here downloads anything or touches $HOME.
"""

from __future__ import annotations

import os

# OpenMP threads that wait by spinning fight any other busy process for the cores: with one
# core kept busy beside it, two test modules took 150 s spinning and 25 s sleeping (20 s and
# 25 s on a quiet machine). Set before torch (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest

from pisa_cli.models.synthetic import save_random_base
from tests.builders import write_adapter_folder, write_official_checkpoint, write_second_lora


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(config, items):
    """Tests that start Ray run on one pytest-xdist worker, one after the other (one Ray
    instance at a time on two cores; ``--dist loadgroup``), and first: while they run, the
    other worker takes the fast tests (light beside Ray's processes; the other slow ones,
    the rank and kill tests, starve Ray's workers on two cores), then both share the rest
    of the slow ones. Tests marked cuda (the cuda case of ``device``) are skipped, with the
    reason, where torch sees no CUDA GPU; on a GPU ``pytest -m cuda`` runs just them."""
    import torch

    def marked(item, name: str) -> bool:
        return item.get_closest_marker(name) is not None

    for item in items:
        if marked(item, "ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))
    items.sort(key=lambda item: 0 if marked(item, "ray") else 2 if marked(item, "slow") else 1)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"no CUDA GPU (torch {torch.__version__}): run on a GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """The device a test runs on: the CPU, and CUDA where there is a GPU (marked cuda)."""
    import torch

    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's caches or picks up their settings."""
    home = tmp_path_factory.getbasetemp() / "home"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PISA_WEIGHTS", raising=False)
    monkeypatch.delenv("PISA_BASE_MODEL", raising=False)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A random tiny base model folder (unet, vae, text_encoder, tokenizer, scheduler)."""
    return save_random_base(tmp_path_factory.mktemp("models") / "tiny-sd21", "tiny", seed=0)


@pytest.fixture(scope="session")
def pisa_pkl(tiny_base, tmp_path_factory) -> Path:
    return write_official_checkpoint(tiny_base, tmp_path_factory.mktemp("weights") / "pisa_sr.pkl")


@pytest.fixture(scope="session")
def pipeline(tiny_base, pisa_pkl):
    """A pipeline on the tiny model, fp32 on the CPU, PiSA weights merged."""
    from pisa_cli import load_pipeline

    return load_pipeline(
        weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu", dtype="fp32"
    )


@pytest.fixture(scope="session")
def second_lora(tiny_base, tmp_path_factory) -> Path:
    return write_second_lora(tiny_base, tmp_path_factory.mktemp("second") / "tudsr-lora")


@pytest.fixture(scope="session")
def adapter_folder(tiny_base, tmp_path_factory) -> Path:
    """An OMGSR-style folder (records no timestep, as the official one)."""
    return write_adapter_folder(tiny_base, tmp_path_factory.mktemp("omgsr") / "omgsr-s")


@pytest.fixture(scope="session")
def adapter_folder_2(tiny_base, tmp_path_factory) -> Path:
    """Another one, as TUDSR's LoRA-2 (different weights and ranks)."""
    folder = tmp_path_factory.mktemp("omgsr") / "lora-2"
    return write_adapter_folder(tiny_base, folder, seed=6, unet_rank=4, vae_rank=2, vae_alpha=2)


@pytest.fixture(scope="session")
def hypir_pth(tiny_base, tmp_path_factory) -> Path:
    """A HYPIR_sd2.pth in the release's exact format (tests/hypir_reference.py)."""
    from tests.hypir_reference import write_hypir_weights

    return write_hypir_weights(tiny_base, tmp_path_factory.mktemp("hypir") / "HYPIR_sd2.pth")


@pytest.fixture(scope="session")
def hypir_oracle(tiny_base, hypir_pth):
    """The plain re-implementation of HYPIR's official code on those weights."""
    from tests.hypir_reference import load_hypir_reference

    return load_hypir_reference(tiny_base, hypir_pth)
