"""HYPIR-SD2 (REFERENCE section 10): its weights reader, its tiler, and its whole path against
an independent oracle of the official code (tests/hypir_reference.py) on a weight file in
the release's exact format."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pisa_cli.core.families.hypir_steps import HypirParts, HypirSettings, upscale_image
from pisa_cli.core.families.hypir_tiles import enlarged_size, plan_windows, window_origins
from pisa_cli.core.families.hypir_weights import is_hypir_weights, load_hypir_weights
from pisa_cli.errors import OptionsError, WeightsError
from pisa_cli.models.base import load_part
from pisa_cli.models.lora import PisaUNet, UnetAdapter
from pisa_cli.models.text import PromptEncoder
from tests.helpers import assert_close, noise_image
from tests.hypir_reference import hypir_enhance, prompt_embeds


@pytest.fixture(scope="module")
def ours(tiny_base, hypir_pth):
    weights = load_hypir_weights(hypir_pth)
    unet = PisaUNet(load_part(tiny_base, "unet").eval(), _first(weights), "first")
    prompts = PromptEncoder(
        lambda: load_part(tiny_base, "tokenizer"), lambda: load_part(tiny_base, "text_encoder")
    )
    scheduler = load_part(tiny_base, "scheduler")

    def parts(prompt: str = "") -> HypirParts:
        vae = load_part(tiny_base, "vae").eval()
        return HypirParts(unet, vae, prompts(prompt), scheduler.alphas_cumprod)

    return parts


def differences(a, b) -> tuple[int, float]:
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    return int(diff.max()), float(diff.mean())


# (input size (w, h), our settings, the official enhance()'s arguments)
CASES = {
    "defaults x4": ((40, 36), {}, {}),
    "padding, patch 128": (
        (27, 37),
        {"patch": 128, "stride": 64},
        {"patch_size": 128, "stride": 64},
    ),
    "small tiles 128/48": (
        (68, 56),
        {"patch": 128, "stride": 48},
        {"patch_size": 128, "stride": 48},
    ),
    "x2": (
        (36, 44),
        {"scale": 2, "patch": 64, "stride": 32},
        {"upscale": 2, "patch_size": 64, "stride": 32},
    ),
    "timestep 400": (
        (20, 24),
        {"patch": 64, "stride": 32, "model_t": 400, "coeff_t": 400},
        {"patch_size": 64, "stride": 32, "model_t": 400, "coeff_t": 400},
    ),
}


SLOW = {"defaults x4"}
"""Patch 512: the input is enlarged to a 512 short side whatever its size (about 3 s)."""


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES]
)
def test_reproduces_the_official_code(ours, hypir_oracle, case):
    size, ours_kw, theirs_kw = CASES[case]
    image = noise_image(*size, seed=3)
    result = upscale_image(ours(), image, HypirSettings(**ours_kw))
    theirs = hypir_enhance(hypir_oracle, image, **theirs_kw)
    scale = ours_kw.get("scale", 4)
    assert result.size == theirs.size == (size[0] * scale, size[1] * scale)
    print(case, differences(result, theirs))
    assert_close(result, theirs)


def test_a_custom_prompt(ours, hypir_oracle, tiny_base):
    prompt = "a photo of a red brick wall, sharp"
    prompted = replace(hypir_oracle, prompt_embeds=prompt_embeds(tiny_base, prompt))
    image = noise_image(20, 16, seed=4)
    settings = HypirSettings(patch=64, stride=32, prompt=prompt)
    result = upscale_image(ours(prompt), image, settings)
    theirs = hypir_enhance(prompted, image, patch_size=64, stride=32)
    print("prompt", differences(result, theirs))
    assert_close(result, theirs)
    plain = upscale_image(ours(), image, HypirSettings(patch=64, stride=32))
    assert differences(plain, result)[1] > 0.5  # the prompt matters at this bar


def test_windows_as_the_official_sliding_windows():
    assert window_origins(64, 64, 32) == [0]
    assert window_origins(100, 64, 32) == [0, 32, 36]
    assert window_origins(96, 64, 32) == [0, 32]
    plan = plan_windows(28, 34, 16, 6)
    assert len(plan.tiles) == 12 and plan.y_shift == 0.5
    assert [(t.top, t.left) for t in plan.tiles[:5]] == [(0, 0), (0, 6), (0, 12), (0, 18), (6, 0)]
    assert enlarged_size(96, 80, 512) == (614, 512)
    assert enlarged_size(512, 700, 512) == (512, 700)  # short side = patch: resized to itself
    assert enlarged_size(513, 700, 512) == (513, 700)


def test_weights_are_recognised_by_their_keys(hypir_pth, pisa_pkl, tmp_path):
    assert is_hypir_weights(hypir_pth)
    assert not is_hypir_weights(pisa_pkl)
    renamed = tmp_path / "HYPIR_sd2.pth"
    renamed.write_bytes(pisa_pkl.read_bytes())
    assert not is_hypir_weights(renamed)  # the name alone is not enough
    weights = load_hypir_weights(hypir_pth)
    assert weights.ranks == (8,) and all(layer.scaling == 1.0 for layer in weights.layers)
    assert "rank 8" in weights.describe()


def _b(key: str) -> str:
    return key.replace("lora_A", "lora_B")


def _hostile(tmp_path, state: dict):
    path = tmp_path / "HYPIR_sd2.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s, k: s.update({k: s[k][:0], _b(k): s[_b(k)][:, :0]}), "rank 0"),
        (lambda s, k: s[k].view(-1).__setitem__(0, float("nan")), "inf or NaN"),
        (lambda s, k: s.update({_b(k): s[_b(k)][:, :3]}), "do not agree"),
        (lambda s, k: s.pop(k), "no lora_A"),
        (lambda s, k: s.update({"extra": torch.zeros(1)}), "unexpected key 'extra'"),
        (lambda s, k: s.update({k: s[k].int()}), "not floats"),
        (lambda s, k: s.update({k: [1, 2]}), "not a tensor"),
        (
            lambda s, k: s.update(
                {
                    "conv_in.lora_A.default.weight": torch.zeros(2, 4, 3, 3),
                    "conv_in.lora_B.default.weight": torch.zeros(16, 2, 1, 1),
                }
            ),
            "not one of HYPIR's target modules",
        ),
    ],
    ids=["zero rank", "nan", "shapes", "missing half", "extra key", "ints", "list", "conv_in"],
)
def test_hostile_weights_are_refused_with_one_line(hypir_pth, tmp_path, change, message):
    state = torch.load(hypir_pth, weights_only=True)
    key = next(k for k in state if k.endswith("attn1.to_q.lora_A.default.weight"))
    change(state, key)
    with pytest.raises(WeightsError) as caught:
        load_hypir_weights(_hostile(tmp_path, state))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_a_module_the_unet_lacks_is_refused(tiny_base, hypir_pth, tmp_path):
    state = torch.load(hypir_pth, weights_only=True)
    state["down_blocks.9.resnets.0.conv1.lora_A.default.weight"] = torch.zeros(2, 16, 3, 3)
    state["down_blocks.9.resnets.0.conv1.lora_B.default.weight"] = torch.zeros(16, 2, 1, 1)
    weights = load_hypir_weights(_hostile(tmp_path, state))
    with pytest.raises(WeightsError, match="does not exist in the UNet"):
        PisaUNet(load_part(tiny_base, "unet"), _first(weights), "first")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "HYPIR_sd2.pth"
    torch.save({"a.to_q.lora_A.default.weight": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(WeightsError, match="refused to load"):
        load_hypir_weights(path)
    assert not is_hypir_weights(path)


def test_settings_refuse_what_the_official_code_cannot_run():
    with pytest.raises(OptionsError, match="multiple of 8"):
        HypirSettings(patch=100)
    with pytest.raises(OptionsError, match="stride"):
        HypirSettings(patch=128, stride=136)


def test_each_detail_of_the_official_path_matters(ours, hypir_oracle, monkeypatch):
    """Honesty of the bar above: the y-centre quirk, the zero padding, the unclamped decode
    and model_t each move pixels far outside it (on an input that needs padding)."""
    import pisa_cli.core.families.hypir_steps as core_hypir
    import pisa_cli.core.families.hypir_tiles as engine_hypir

    image = noise_image(27, 37, seed=3)
    settings = HypirSettings(patch=128, stride=64)
    theirs = hypir_enhance(hypir_oracle, image, patch_size=128, stride=64)
    assert (
        differences(
            upscale_image(ours(), image, HypirSettings(patch=128, stride=64, model_t=201)), theirs
        )[0]
        > 3
    )

    def centred(size, dtype, device):
        index = torch.arange(size, dtype=torch.float64)
        gauss = torch.exp(-((index - (size - 1) / 2) ** 2) / (2 * (0.1 * size) ** 2))
        return torch.outer(gauss, gauss).to(device, dtype)

    pad, decode = torch.nn.functional.pad, core_hypir.vae_engine.decode

    def replicate(x, margins, mode="constant", value=0.0):  # the image's padding only
        return pad(x, margins, mode="replicate" if x.shape[1] == 3 else mode, value=value)

    variants = {
        "window_weights": (engine_hypir, "window_weights", centred),
        "replicate": (engine_hypir.F, "pad", replicate),
        "clamped": (core_hypir.vae_engine, "decode", lambda v, z, clamp, **kw: decode(v, z, **kw)),
    }
    for name, (where, attribute, replacement) in variants.items():
        with monkeypatch.context() as patch:
            patch.setattr(where, attribute, replacement)
            assert differences(upscale_image(ours(), image, settings), theirs)[0] > 3, name


def _first(weights) -> dict:
    return {"first": UnetAdapter(weights.layers, weights.source)}
