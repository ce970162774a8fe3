"""Hostile weights: adapter configs, recorded timesteps, tensors and files that cannot load
are refused with one line naming the file, exit 3, before the model loads and before the
output folder is created; a load that fails anyway leaves no folder the run made."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from pisa_cli.cli import app
from pisa_cli.core.families.omgsr_folder import load_adapter_folder
from pisa_cli.errors import WeightsError
from tests.builders import noise_image
from tests.fakes import run_on

UNET, VAE = "unet_lora_adapter", "vae_encoder_lora_adapter"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _set_config(path, **values):
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **values}))


def _zero_rank(path):
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    up = key.replace("lora_A", "lora_B")
    tensors[key] = tensors[key][:0].contiguous()
    tensors[up] = tensors[up][:, :0].contiguous()
    save_file(tensors, str(path))


def _deep(path):
    depth = 200_000
    path.write_text('{"r": 4, "x": ' + "[" * depth + "]" * depth + "}")


HOSTILE = {
    "alpha_pattern regex": (
        lambda f: _set_config(f / UNET / CONFIG, alpha_pattern={"[": 8}),
        UNET,
        "alpha_pattern key '[' is not a valid regular expression",
    ),
    "rank_pattern regex": (
        lambda f: _set_config(f / VAE / CONFIG, rank_pattern={"(": 4}),
        VAE,
        "rank_pattern key '(' is not a valid regular expression",
    ),
    "alpha_pattern text": (
        lambda f: _set_config(f / UNET / CONFIG, alpha_pattern={"conv1": "eight"}),
        UNET,
        "alpha_pattern value 'eight' for 'conv1' is not a number",
    ),
    "rank_pattern list": (
        lambda f: _set_config(f / UNET / CONFIG, rank_pattern={"conv1": [8]}),
        UNET,
        "rank_pattern value [8] for 'conv1' is not a whole number above 0",
    ),
    "zero rank": (lambda f: _zero_rank(f / VAE / WEIGHTS), VAE, "is empty"),
    "nested config": (lambda f: _deep(f / UNET / CONFIG), UNET, "nested too deep"),
    "cfg.yml 5000 digits": (
        lambda f: (f / "cfg.yml").write_text("mid_timestep: " + "9" * 5000 + "\n"),
        "cfg.yml",
        "is not a whole number from 1 to 999",
    ),
    "cfg.yml not utf-8": (
        lambda f: (f / "cfg.yml").write_bytes(b"mid_timestep: 273\nname: \xff\xfe\n"),
        "cfg.yml",
        "not UTF-8 text",
    ),
    "cfg.yml fraction": (
        lambda f: (f / "cfg.yml").write_text("mid_timestep: 273.9\n"),
        "cfg.yml",
        "'273.9' is not a whole number from 1 to 999",
    ),
    "config timestep true": (
        lambda f: _set_config(f / UNET / CONFIG, timestep=True),
        UNET,
        "timestep True is not a whole number from 1 to 999",
    ),
    "config timestep fraction": (
        lambda f: _set_config(f / VAE / CONFIG, timestep=273.9),
        VAE,
        "timestep 273.9 is not a whole number",
    ),
    "missing safetensors": (
        lambda f: (f / VAE / WEIGHTS).unlink(),
        VAE,
        "needs adapter_config.json and adapter_model.safetensors",
    ),
}


def _args(tiny_base, weights, out):
    return ["--base-model", tiny_base, "--weights", weights, "--device", "cpu", "-o", out]


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_adapter_folders_are_refused_before_anything_is_created(
    tiny_base, adapter_folder, tmp_path, case
):
    breaks, where, message = HOSTILE[case]
    folder = tmp_path / "hostile"
    shutil.copytree(adapter_folder, folder)
    breaks(folder)
    photo = tmp_path / "photo.png"
    noise_image(16, 16).save(photo)
    out = tmp_path / "out"
    result = run_on(None, "upscale", photo, *_args(tiny_base, folder, out))  # no model load
    assert result.exit_code == 3, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert str(folder / where) in line and message in line, line
    assert "Traceback" not in result.output and not out.exists()
    dry = run_on(None, "upscale", photo, *_args(tiny_base, folder, out), "--dry-run")
    assert dry.exit_code == 3 and message in dry.output, dry.output
    if case != "missing safetensors":  # loading refuses it too, with the same kind of line
        with pytest.raises(WeightsError, match=r"not a|nested|empty|UTF-8"):
            load_adapter_folder(folder)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[(273, 273), ("273", 273), (" 1 ", 1), (999, 999), (0, None), (1000, None)],
        *[(True, None), (273.9, None), (273.0, None), ([273], None), ("9" * 5000, None)],
        ("-5", None),
    ],
)
def test_a_recorded_timestep_is_a_whole_number_from_1_to_999(value, expected):
    from pisa_cli.models.second_lora import whole_timestep

    if expected is None:
        with pytest.raises(WeightsError, match="not a whole number from 1 to 999"):
            whole_timestep(value, "f: timestep")
    else:
        assert whole_timestep(value, "f: timestep") == expected


def test_a_text_file_as_weights_leaves_no_folder(tiny_base, tmp_path):
    weights = tmp_path / "weights.txt"
    weights.write_text("these are not weights\n")
    photo = tmp_path / "photo.png"
    noise_image(16, 16).save(photo)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["upscale", str(photo), *map(str, _args(tiny_base, weights, out))]
    )
    assert result.exit_code == 3, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert f"{weights}: not a PiSA-SR checkpoint (a text file" in line
    assert not out.exists()


def test_a_failed_load_removes_the_folder_the_run_made(tiny_base, pisa_pkl, tmp_path):
    photo = tmp_path / "photo.png"
    noise_image(16, 16).save(photo)

    def fails(model, options):
        raise WeightsError(f"{pisa_pkl}: does not fit the UNet")

    out = tmp_path / "new" / "out"
    (tmp_path / "new").mkdir()
    args = ["upscale", photo, *_args(tiny_base, pisa_pkl, out)]
    result = CliRunner().invoke(app, [str(a) for a in args], obj={"pipeline_factory": fails})
    assert result.exit_code == 3 and "does not fit the UNet" in result.output
    assert not out.exists() and (tmp_path / "new").is_dir()
    deep = tmp_path / "a" / "b" / "out"  # the parents it made go too
    args = ["upscale", photo, *_args(tiny_base, pisa_pkl, deep)]
    result = CliRunner().invoke(app, [str(a) for a in args], obj={"pipeline_factory": fails})
    assert result.exit_code == 3 and not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # a folder the run did not make stays, empty or not
    args = ["upscale", photo, *_args(tiny_base, pisa_pkl, kept)]
    result = CliRunner().invoke(app, [str(a) for a in args], obj={"pipeline_factory": fails})
    assert result.exit_code == 3 and kept.is_dir()


def test_a_zero_rank_lora_is_refused_when_loaded(tiny_base, adapter_folder, tmp_path):
    folder = tmp_path / "zero"
    shutil.copytree(adapter_folder, folder)
    _zero_rank(folder / UNET / WEIGHTS)
    with pytest.raises(WeightsError, match="empty tensors"):
        load_adapter_folder(folder)


def test_a_hostile_second_pass_folder_is_refused_before_anything_is_created(
    tiny_base, pisa_pkl, second_lora, tmp_path
):
    folder = tmp_path / "second"
    shutil.copytree(second_lora, folder)
    _set_config(folder / CONFIG, alpha_pattern={"[": 8})
    photo = tmp_path / "photo.png"
    noise_image(16, 16).save(photo)
    out = tmp_path / "out"
    args = [*_args(tiny_base, pisa_pkl, out), "--second-pass", "tudsr"]
    result = run_on(None, "upscale", photo, *args, "--second-pass-weights", folder)
    assert result.exit_code == 3, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert str(folder / CONFIG) in line and "not a valid regular expression" in line
    assert not out.exists()
