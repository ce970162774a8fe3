"""The merged-UNet and prompt-embedding cache: used when valid, never when stale."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pisa_cli import load_pipeline
from pisa_cli.models import cache
from pisa_cli.models.lora import PisaUNet
from pisa_cli.options import UpscaleOptions
from tests.builders import noise_image


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
    """Counts LoRA merges into the UNet: while it loads (the first run), or after."""
    from pisa_cli.core import loading

    calls = []
    original, while_loading = PisaUNet._merge, loading.merge_while_loading

    def counted(self, layers, modules):
        calls.append(len(layers))
        return original(self, layers, modules)

    def counted_while_loading(layers):
        calls.append(len(layers))
        return while_loading(layers)

    monkeypatch.setattr(PisaUNet, "_merge", counted)
    monkeypatch.setattr(loading, "merge_while_loading", counted_while_loading)
    return calls


def test_second_load_skips_the_merge_and_gives_the_same_weights(
    tiny_base, pisa_pkl, cache_dir, monkeypatch
):
    merges = count_merges(monkeypatch)
    first = load(tiny_base, pisa_pkl)
    assert len(merges) == 1 and len(list((cache_dir / "merged").iterdir())) == 1
    second = load(tiny_base, pisa_pkl)
    assert len(merges) == 1  # served from the cache
    a, b = first.models.unet.unet.state_dict(), second.models.unet.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    image = noise_image(24, 20, 1)
    options = UpscaleOptions(process_size=64, lambda_sem=0.5)
    assert np.array_equal(
        np.asarray(first.upscale(image, options)), np.asarray(second.upscale(image, options))
    )


@pytest.mark.slow
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
    expected = first.models.embed("")
    original = base.load_part

    def no_text_encoder(folder, part):
        assert part not in ("text_encoder", "tokenizer"), "text encoder loaded"
        return original(folder, part)

    monkeypatch.setattr(base, "load_part", no_text_encoder)
    second = load(tiny_base, pisa_pkl)
    assert torch.equal(second.models.embed(""), expected)
    assert second.models.prompts.encodes == 0


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


def _entry(header: object, data: bytes = bytes(16), raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


W = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
DAMAGED = {
    "no offsets": _entry({"w": {"dtype": "F32", "shape": [4]}}),
    "no shape": _entry({"w": {"dtype": "F32", "data_offsets": [0, 16]}}),
    "no dtype": _entry({"w": {"shape": [4], "data_offsets": [0, 16]}}),
    "odd dtype": _entry({"w": {**W, "dtype": "F99"}}),
    "dtype not text": _entry({"w": {**W, "dtype": ["F32"]}}),
    "offsets not a pair": _entry({"w": {**W, "data_offsets": [0, 8, 16]}}),
    "offsets not numbers": _entry({"w": {**W, "data_offsets": ["0", "16"]}}),
    "offsets backwards": _entry({"w": {**W, "data_offsets": [16, 0]}}),
    "offsets negative": _entry({"w": {**W, "data_offsets": [-16, 0]}}),
    "offsets past the end": _entry({"w": {**W, "data_offsets": [0, 1 << 40]}}),
    "shape not a list": _entry({"w": {**W, "shape": 4}}),
    "shape negative": _entry({"w": {**W, "shape": [-4]}}),
    "shape not numbers": _entry({"w": {**W, "shape": ["4"]}}),
    "shape and bytes disagree": _entry({"w": {**W, "shape": [5]}}),
    "entry not an object": _entry({"w": [1, 2]}),
    "header a list": _entry([1, 2]),
    "header not JSON": _entry(None, raw_header=b"{not json}"),
    "header not UTF-8": _entry(None, raw_header=b'{"\xff": 1}'),
    "header nested deep": _entry(
        None, raw_header=b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    ),
    "truncated data": _entry({"w": W}, data=bytes(8)),
    "length past the end": (1 << 40).to_bytes(8, "little") + b"{}",
    "too short": b"\x01\x02",
}


@pytest.mark.parametrize("content", list(DAMAGED.values()), ids=list(DAMAGED))
def test_a_damaged_entry_of_any_kind_is_dropped_with_one_warning(cache_dir, caplog, content):
    entry = cache_dir / "merged" / "key.safetensors"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(content)
    with caplog.at_level("WARNING", logger="pisa_cli"):
        assert cache.load_tensors("merged", "key") is None
    assert not entry.exists()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "rebuilding" in warnings[0].getMessage()


def test_an_entry_that_does_not_fit_the_unet_is_rebuilt(
    tiny_base, pisa_pkl, cache_dir, monkeypatch, caplog
):
    """Readable, but not what this run would have written: a tensor missing, one of
    another shape, one of another dtype."""
    from safetensors.torch import load_file, save_file

    load(tiny_base, pisa_pkl)
    entry = next((cache_dir / "merged").iterdir())
    state = load_file(str(entry))
    names = sorted(state)
    damaged = [
        {k: v for k, v in state.items() if k != names[0]},
        {**state, names[1]: state[names[1]].flatten()[:-1].contiguous()},
        {**state, names[2]: state[names[2]].to(torch.float16)},
    ]
    merges = count_merges(monkeypatch)
    for tensors in damaged:
        save_file(tensors, str(entry))
        caplog.clear()
        load(tiny_base, pisa_pkl)
        assert "rebuilding" in caplog.text
    assert len(merges) == len(damaged)
    load(tiny_base, pisa_pkl)  # the rebuilt entry is served again
    assert len(merges) == len(damaged)


def test_a_damaged_prompt_entry_is_rebuilt(tiny_base, pisa_pkl, cache_dir, caplog):
    from safetensors.torch import save_file

    first = load(tiny_base, pisa_pkl)
    expected = first.models.embed("")
    entry = next((cache_dir / "prompts").iterdir())
    for tensors in (
        {"embedding": expected[0]},  # a dimension short
        {"embedding": expected.to(torch.float16)},
        {"other": expected},
    ):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(entry))
        caplog.clear()
        again = load(tiny_base, pisa_pkl)
        assert torch.equal(again.models.embed(""), expected)
        assert again.models.prompts.encodes == 1 and "rebuilding" in caplog.text


@pytest.mark.parametrize(
    "content",
    ["[1, 2]", '{"x": 1}', "{not json", "[" * 100_000 + "]" * 100_000, '"text"'],
    ids=["list", "odd values", "not json", "deep", "string"],
)
def test_a_damaged_digest_index_is_rebuilt(cache_dir, tmp_path, caplog, content):
    import hashlib

    path = tmp_path / "weights.bin"
    path.write_bytes(b"one")
    cache_dir.mkdir()
    (cache_dir / "digests.json").write_text(content)
    assert cache.file_digest(path) == hashlib.sha256(b"one").hexdigest()
    assert cache.file_digest(path) == hashlib.sha256(b"one").hexdigest()  # and remembered


def test_a_wrong_remembered_digest_is_not_trusted(cache_dir, tmp_path):
    import hashlib

    path = tmp_path / "weights.bin"
    path.write_bytes(b"one")
    cache.file_digest(path)
    index = json.loads((cache_dir / "digests.json").read_text())
    (cache_dir / "digests.json").write_text(json.dumps({k: 42 for k in index}))
    assert cache.file_digest(path) == hashlib.sha256(b"one").hexdigest()
