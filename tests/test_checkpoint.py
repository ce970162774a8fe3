"""Reading pisa_sr.pkl safely, converting it to safetensors, and refusing bad files."""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import save_file

from pisa_cli.errors import WeightsError
from pisa_cli.models.base import load_part
from pisa_cli.models.checkpoint import (
    load_checkpoint,
    resolve_weights_path,
    save_safetensors,
)
from pisa_cli.models.lora import PisaUNet


def test_official_pickle_loads(pisa_pkl):
    checkpoint = load_checkpoint(pisa_pkl)
    assert dict(checkpoint.ranks) == {"pix": 4, "sem": 4}
    assert dict(checkpoint.alphas) == {"pix": 8.0, "sem": 8.0}
    assert set(checkpoint.modules) == {
        f"default_{g}_{b}" for g in ("encoder", "decoder", "others") for b in ("pix", "sem")
    }
    layers = list(checkpoint.layers("sem"))
    assert len(layers) == sum(
        len(checkpoint.modules[f"default_{g}_sem"]) for g in ("encoder", "decoder", "others")
    )
    assert layers[0].scaling == 2.0
    assert all(layer.up.abs().sum() > 0 for layer in layers)


def test_safetensors_round_trip_is_bit_identical(pisa_pkl, tiny_base, tmp_path):
    original = load_checkpoint(pisa_pkl)
    path = tmp_path / "pisa_sr.safetensors"
    save_safetensors(original, path)
    converted = load_checkpoint(path)
    assert converted.modules == original.modules
    assert dict(converted.ranks) == dict(original.ranks)
    assert dict(converted.alphas) == dict(original.alphas)
    assert converted.tensors.keys() == original.tensors.keys()
    for key, tensor in original.tensors.items():
        assert torch.equal(converted.tensors[key], tensor), key
    # and the merged UNet weights are the same bits, for both merged variants
    for merged in ("pix", "pisa"):
        a = PisaUNet(load_part(tiny_base, "unet"), original, merged=merged).unet.state_dict()
        b = PisaUNet(load_part(tiny_base, "unet"), converted, merged=merged).unet.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


class _RunsCode:
    """Unpickling this would create a file: a stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pkl"
    torch.save({"lora_rank_unet_pix": 4, "payload": _RunsCode(marker)}, path)
    with pytest.raises(WeightsError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"this is not a checkpoint at all", "cannot read|not a readable"),
    ],
)
def test_broken_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "pisa_sr.pkl"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=message) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_truncated_pickle(pisa_pkl, tmp_path):
    path = tmp_path / "truncated.pkl"
    path.write_bytes(pisa_pkl.read_bytes()[: pisa_pkl.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_checkpoint(path)


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(WeightsError, match=r"not found.*PiSA-SR"):
        load_checkpoint(tmp_path / "nope.pkl")


def test_no_weights_anywhere(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="--weights"):
        resolve_weights_path("")
    (tmp_path / "pisa-cli").mkdir()
    (tmp_path / "pisa-cli" / "pisa_sr.pkl").write_bytes(b"x")
    assert resolve_weights_path("") == tmp_path / "pisa-cli" / "pisa_sr.pkl"


def test_dict_without_the_pisa_keys(tmp_path):
    path = tmp_path / "other.pkl"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(WeightsError, match="missing key 'lora_rank_unet_pix'"):
        load_checkpoint(path)


def test_missing_tensor_is_named(pisa_pkl, tmp_path):
    raw = torch.load(pisa_pkl, weights_only=True)
    dropped = next(iter(raw["state_dict_unet"]))
    del raw["state_dict_unet"][dropped]
    path = tmp_path / "partial.pkl"
    torch.save(raw, path)
    with pytest.raises(WeightsError, match="is missing") as error:
        load_checkpoint(path)
    assert dropped in str(error.value)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="pisa convert"):
        load_checkpoint(path)
