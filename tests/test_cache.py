"""The merged-UNet and prompt-embedding cache: used when valid, never when stale."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pisa_cli import load_pipeline
from pisa_cli.models import cache
from pisa_cli.models.lora import PisaUNet
from pisa_cli.options import UpscaleOptions
from tests.helpers import noise_image


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("PISA_CACHE_DIR", str(folder))
    return folder


def load(tiny_base, weights, dtype="fp32", **kw):
    return load_pipeline(
        weights=str(weights), base_model=str(tiny_base), device="cpu", dtype=dtype, **kw
    )


def count_merges(monkeypatch) -> list[int]:
    calls = []
    original = PisaUNet._merge

    def counted(self, layers, modules):
        calls.append(len(layers))
        return original(self, layers, modules)

    monkeypatch.setattr(PisaUNet, "_merge", counted)
    return calls


def test_second_load_skips_the_merge_and_gives_the_same_weights(
    tiny_base, pisa_pkl, cache_dir, monkeypatch
):
    merges = count_merges(monkeypatch)
    first = load(tiny_base, pisa_pkl)
    assert len(merges) == 1 and len(list((cache_dir / "merged").iterdir())) == 1
    second = load(tiny_base, pisa_pkl)
    assert len(merges) == 1  # served from the cache
    a, b = first.unet.unet.state_dict(), second.unet.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    image = noise_image(24, 20, 1)
    options = UpscaleOptions(process_size=64, lambda_sem=0.5)
    assert np.array_equal(
        np.asarray(first.upscale(image, options)), np.asarray(second.upscale(image, options))
    )


def test_a_changed_checkpoint_is_never_served_stale(
    tiny_base, pisa_pkl, cache_dir, tmp_path, monkeypatch
):
    merges = count_merges(monkeypatch)
    load(tiny_base, pisa_pkl)
    raw = torch.load(pisa_pkl, weights_only=True)
    key = next(k for k in raw["state_dict_unet"] if "lora_B" in k)
    raw["state_dict_unet"][key] = raw["state_dict_unet"][key] + 1
    changed = tmp_path / "changed.pkl"
    torch.save(raw, changed)
    load(tiny_base, changed)
    assert len(merges) == 2
    load(tiny_base, pisa_pkl, dtype="bf16")  # another dtype is another entry
    assert len(merges) == 3


def test_prompt_embedding_is_cached_so_the_text_encoder_is_not_loaded(
    tiny_base, pisa_pkl, cache_dir, monkeypatch
):
    import pisa_cli.models.base as base

    first = load(tiny_base, pisa_pkl)
    expected = first.embed("")
    original = base.load_part

    def no_text_encoder(folder, part):
        assert part not in ("text_encoder", "tokenizer"), "text encoder loaded"
        return original(folder, part)

    monkeypatch.setattr(base, "load_part", no_text_encoder)
    second = load(tiny_base, pisa_pkl)
    assert torch.equal(second.embed(""), expected)
    assert second.prompts.encodes == 0


def test_a_damaged_entry_is_rebuilt(tiny_base, pisa_pkl, cache_dir, monkeypatch, caplog):
    load(tiny_base, pisa_pkl)
    entry = next((cache_dir / "merged").iterdir())
    entry.write_bytes(entry.read_bytes()[:100])
    merges = count_merges(monkeypatch)
    load(tiny_base, pisa_pkl)
    assert len(merges) == 1 and "unreadable" in caplog.text


def test_cache_can_be_turned_off(tiny_base, pisa_pkl, cache_dir, monkeypatch):
    monkeypatch.setenv("PISA_NO_CACHE", "1")
    load(tiny_base, pisa_pkl)
    assert not (cache_dir / "merged").exists()


def test_file_digest_is_remembered_and_follows_changes(cache_dir, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"one")
    first = cache.file_digest(path)
    assert first == cache.file_digest(path)
    assert "digests.json" in [p.name for p in cache_dir.iterdir()]
    path.write_bytes(b"two, longer")
    assert cache.file_digest(path) != first


def test_only_the_newest_merged_entries_are_kept(cache_dir):
    for index in range(4):
        cache.save_tensors("merged", f"key{index}", {"w": torch.zeros(1)}, keep=2)
    assert sorted(p.stem for p in (cache_dir / "merged").iterdir()) == ["key2", "key3"]
    shutil.rmtree(cache_dir)


def test_mapped_safetensors_equal_the_library_s_copies(tmp_path):
    from safetensors.torch import load_file, save_file

    from pisa_cli.models.cache import map_safetensors

    tensors = {
        "a.bf16": torch.randn(3, 5).to(torch.bfloat16),
        "b.byte": torch.arange(7, dtype=torch.uint8),  # an odd size among wider dtypes
        "c.f32": torch.randn(4, 2, 3),
        "d.i64": torch.arange(5),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    mapped, copied = map_safetensors(path), load_file(str(path))
    assert mapped.keys() == copied.keys()
    for name, tensor in copied.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor), name


def test_a_damaged_mapped_file_is_refused(tmp_path):
    from pisa_cli.models.cache import map_safetensors

    path = tmp_path / "t.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(ValueError, match="malformed"):
        map_safetensors(path)
