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
from pisa_cli.models.lora import PisaUNet, checkpoint_adapters


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
        a = PisaUNet(
            load_part(tiny_base, "unet"), checkpoint_adapters(original), merged=merged
        ).unet.state_dict()
        b = PisaUNet(
            load_part(tiny_base, "unet"), checkpoint_adapters(converted), merged=merged
        ).unet.state_dict()
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
        (b"this is not a checkpoint at all", "not a PiSA-SR checkpoint \\(a text file"),
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


def _torch_file_with(path: pathlib.Path, data_pkl: bytes) -> pathlib.Path:
    """A torch zip checkpoint whose pickle is ``data_pkl``, written by hand (torch.save
    itself cannot write what these tests need)."""
    import zipfile

    template = path.with_suffix(".template")
    torch.save({"a": 1}, template)
    with zipfile.ZipFile(template) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            content = source.read(info.filename)
            target.writestr(
                info.filename, data_pkl if info.filename.endswith("data.pkl") else content
            )
    template.unlink()
    return path


DEEP = 200_000


def _safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


BAD_WEIGHTS = {
    # 200,000 nested lists: each level is one opcode, but checking them recursed
    "deep.pkl": lambda p: _torch_file_with(p, b"\x80\x02" + b"]" * DEEP + b"a" * (DEEP - 1) + b"."),
    "deep-dict.pkl": lambda p: _torch_file_with(
        p, b"\x80\x02}X\x01\x00\x00\x00k" + b"}" * DEEP + b"X\x01\x00\x00\x00ks" * DEEP + b"s."
    ),
    "text.pkl": lambda p: p.write_text("these are not the weights you are looking for\n"),
    "json.pkl": lambda p: p.write_text('{"lora_rank_unet_pix": 4}\n'),
    "digits.pkl": lambda p: p.write_text("123456\n"),
    "binary.pkl": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "empty.pkl": lambda p: p.write_bytes(b""),
    "other.zip": lambda p: __import__("zipfile").ZipFile(p, "w").writestr("a.txt", "hi"),
    "cut.pkl": lambda p: p.write_bytes(b"PK\x03\x04" + bytes(40)),
    "list.pkl": lambda p: torch.save([torch.zeros(2)], p),
    "folder": lambda p: p.mkdir(),
    "folder.safetensors": lambda p: p.mkdir(),
    "text.safetensors": lambda p: p.write_text("hello there, this is a text file\n"),
    "empty.safetensors": lambda p: p.write_bytes(b""),
    "short.safetensors": lambda p: p.write_bytes(b"\x01\x02"),
    "bad-json.safetensors": lambda p: p.write_bytes(_safetensors_bytes(b"{not json}   ")),
    "deep-json.safetensors": lambda p: p.write_bytes(
        _safetensors_bytes(b"{" + b'"a":{' * DEEP + b"}" * DEEP + b"}")
    ),
    "cut.safetensors": lambda p: p.write_bytes(
        _safetensors_bytes(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"x")
    ),
    "no-offsets.safetensors": lambda p: p.write_bytes(
        _safetensors_bytes(b'{"w": {"dtype": "F32", "shape": [1]}}', bytes(4))
    ),
    "header-list.safetensors": lambda p: p.write_bytes(_safetensors_bytes(b"[1, 2, 3]")),
}


@pytest.mark.parametrize("name", list(BAD_WEIGHTS))
def test_every_unusable_weights_file_is_one_line_and_exit_3(tmp_path, name):
    from PIL import Image
    from typer.testing import CliRunner

    from pisa_cli.cli import app

    bad = tmp_path / name
    BAD_WEIGHTS[name](bad)
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    arguments = ["upscale", str(tmp_path / "img.png"), "-o", str(tmp_path / "out")]
    arguments += ["--weights", str(bad), "--base-model", str(tmp_path / "no-base")]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 3, (result.exception, result.output[-500:])
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}"), result.output[-500:]
    assert "arbitrary code" not in lines[0]  # said of real pickles with foreign objects only
    if name.startswith("folder"):
        assert "is a folder" in lines[0]
    elif name.startswith(("text", "json", "digits", "binary")):
        assert "not a PiSA-SR checkpoint" in lines[0]


def _second_lora_cases(tmp_path: pathlib.Path) -> list[pathlib.Path]:
    from safetensors.torch import save_file

    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("[1, 2, 3]")  # JSON, not an object
    save_file({"w": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    packed = tmp_path / "packed.safetensors"
    save_file({"w": torch.zeros(1)}, str(packed), metadata={"lora_adapter_metadata": "[1]"})
    deep = tmp_path / "deep.safetensors"
    nested = "[" * 100_000 + "]" * 100_000
    save_file({"w": torch.zeros(1)}, str(deep), metadata={"lora_adapter_metadata": nested})
    return [folder, packed, deep]


def test_an_unusable_second_pass_lora_is_one_line(tmp_path):
    from pisa_cli.models.second_lora import load_second_lora

    for path in _second_lora_cases(tmp_path):
        with pytest.raises(WeightsError) as error:
            load_second_lora(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
