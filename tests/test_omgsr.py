"""The OMGSR-style family: an adapter folder (UNet + VAE-encoder LoRA at a mid timestep) as
the first pass, as the x2 second pass, and both (TUDSR M4N2 / M2N2), against an independent
oracle of the official OMGSR-S script (tests/omgsr_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from pisa_cli import load_pipeline
from pisa_cli.core.families.omgsr_folder import load_adapter_folder
from pisa_cli.options import SecondPassOptions, TileOptions, UpscaleOptions
from tests.builders import noise_image, write_adapter_folder
from tests.helpers import assert_close
from tests.omgsr_reference import load_omgsr_reference, omgsr_upscale
from tests.reference import load_reference, reference_upscale

PISA, OMGSR = "pisa-sr", "omgsr"
PROCESS = 64
"""Process size of the tests: latent tiles of 8 with overlap 4 by default, as 512 gives 64/32."""


def load(base, weights, **options):
    options = UpscaleOptions(**options) if options else None
    kw = {"device": "cpu", "dtype": "fp32", "options": options}
    return load_pipeline(weights=str(weights), base_model=str(base), **kw)


def tudsr(weights, **kw) -> SecondPassOptions:
    return SecondPassOptions(kind="tudsr", weights=str(weights), **kw)


def differences(ours, theirs) -> tuple[int, float]:
    diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
    return int(diff.max()), float(diff.mean())


@pytest.fixture(scope="module")
def omgsr_pipe(tiny_base, adapter_folder):
    return load(tiny_base, adapter_folder)


@pytest.fixture(scope="module")
def oracle(tiny_base, adapter_folder):
    return load_omgsr_reference(tiny_base, adapter_folder)


@pytest.fixture(scope="module")
def oracle_2(tiny_base, adapter_folder_2):
    return load_omgsr_reference(tiny_base, adapter_folder_2)


# (input size, our options, the official script's arguments)
CASES = {
    "x4 untiled": ((16, 16), {}, {}),
    "x4 default tiles": ((24, 20), {}, {}),
    "wavelet": ((24, 20), {"color_fix": "wavelet"}, {"align_method": "wavelet"}),
    "no colour fix": ((24, 20), {"color_fix": "none"}, {"align_method": "nofix"}),
    "x2": ((36, 32), {"scale": 2}, {"upscale": 2}),
    "timestep 500": ((24, 20), {"timestep": 500}, {"timestep": 500}),
    "latent tiles 12/4, short side clipped, small input": (
        (40, 12),
        {"tiles": TileOptions(latent_tile=12, latent_overlap=4)},
        {"tile_size": 12, "tile_overlap": 4},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reproduces_the_official_script(omgsr_pipe, oracle, case):
    size, ours_kw, theirs_kw = CASES[case]
    image = noise_image(*size, seed=3)
    ours = omgsr_pipe.upscale(image, UpscaleOptions(process_size=PROCESS, **ours_kw))
    theirs = omgsr_upscale(oracle, image, process_size=PROCESS, **theirs_kw)
    scale = ours_kw.get("scale", 4)
    assert ours.size == (size[0] * scale, size[1] * scale)
    print(case, differences(ours, theirs))
    assert_close(ours, theirs)


def test_each_detail_of_the_procedure_matters(omgsr_pipe, oracle, tiny_base):
    """Honesty of the bar above: a timestep off by one, or the encoder without its LoRA,
    is far outside it."""
    image = noise_image(24, 20, seed=3)
    theirs = omgsr_upscale(oracle, image, process_size=PROCESS, align_method="nofix")
    off = omgsr_pipe.upscale(
        image, UpscaleOptions(process_size=PROCESS, color_fix="none", timestep=272)
    )
    assert differences(off, theirs)[1] > 1
    plain = AutoencoderKL.from_pretrained(str(tiny_base), subfolder="vae").encoder
    merged = {k: v.clone() for k, v in omgsr_pipe.models.vae.encoder.state_dict().items()}
    try:
        omgsr_pipe.models.vae.encoder.load_state_dict(plain.state_dict())
        bare = omgsr_pipe.upscale(image, UpscaleOptions(process_size=PROCESS, color_fix="none"))
    finally:
        omgsr_pipe.models.vae.encoder.load_state_dict(merged)
    assert differences(bare, theirs)[1] > 5


def test_only_the_encoder_gets_the_vae_lora(omgsr_pipe, tiny_base, adapter_folder):
    vae = AutoencoderKL.from_pretrained(str(tiny_base), subfolder="vae")
    ours = omgsr_pipe.models.vae
    pairs = zip(ours.decoder.parameters(), vae.decoder.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert torch.equal(ours.quant_conv.weight, vae.quant_conv.weight)
    changed = dict(ours.encoder.named_parameters())
    modules = {layer.module for layer in load_adapter_folder(adapter_folder).encoder}
    for name, param in vae.encoder.named_parameters():
        module = name.removesuffix(".weight")
        assert torch.equal(changed[name], param) != (module in modules), name
    assert omgsr_pipe.passes.family == OMGSR and omgsr_pipe.models.second_vae is None


@pytest.mark.parametrize("where", ["cfg.yml", "adapter_config.json"])
def test_the_timestep_the_folder_records_is_the_default(tiny_base, tmp_path, oracle, where):
    import json
    import shutil

    folder = tmp_path / "recorded"
    shutil.copytree(write_adapter_folder(tiny_base, tmp_path / "src"), folder)
    if where == "cfg.yml":
        (folder / "cfg.yml").write_text("model: omgsr_s_512\nmid_timestep: 400\nseed: 123\n")
    else:
        path = folder / "unet_lora_adapter" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "timestep": 400}))
    pipe = load(tiny_base, folder)
    options = UpscaleOptions(process_size=PROCESS)
    assert pipe.stages(options)[0].timestep == 400
    assert pipe.stages(UpscaleOptions(process_size=PROCESS, timestep=20))[0].timestep == 20
    assert "timestep 400 (recorded in the folder)" in pipe.describe(options)[0]
    image = noise_image(24, 20, seed=4)
    assert_close(
        pipe.upscale(image, options),
        omgsr_upscale(oracle, image, process_size=PROCESS, timestep=400),
    )


def test_default_timestep_is_273(omgsr_pipe):
    stage = omgsr_pipe.stages(UpscaleOptions(process_size=PROCESS))[0]
    assert (stage.timestep, stage.rule, stage.variants, stage.tiling) == (
        273,
        "x0",
        ("first",),
        "square",
    )
    assert "timestep 273 (default 273)" in omgsr_pipe.describe(UpscaleOptions())[0]


# --- as the second pass ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pisa_then_folder(tiny_base, pisa_pkl, adapter_folder_2):
    second = tudsr(adapter_folder_2)
    return load(tiny_base, pisa_pkl, process_size=PROCESS, second_pass=second)


@pytest.mark.slow
def test_pisa_then_an_adapter_folder(
    pisa_then_folder, tiny_base, pisa_pkl, oracle_2, adapter_folder_2
):
    """x8 as PiSA-SR x4 then the folder's x2, each pass against its own official script
    fed what that pass was fed (the script of stage 2 reads stage 1's 8-bit output: a level
    flipped by float noise in stage 1 would otherwise be amplified by the random model)."""
    image = noise_image(20, 16, seed=5)
    options = UpscaleOptions(process_size=PROCESS, second_pass=tudsr(adapter_folder_2))
    first_stage, second_stage = pisa_then_folder.stages(options)
    middle, _ = pisa_then_folder.run_stage(image, first_stage, {}, [])
    ours, _ = pisa_then_folder.run_stage(middle, second_stage, {}, [])
    assert np.array_equal(np.asarray(ours), np.asarray(pisa_then_folder.upscale(image, options)))
    first = reference_upscale(load_reference(tiny_base, pisa_pkl), image, process_size=PROCESS)
    theirs = omgsr_upscale(oracle_2, middle, upscale=2, process_size=PROCESS)
    assert ours.size == (160, 128)
    print("PiSA x4", differences(middle, first), "then folder x2", differences(ours, theirs))
    assert_close(middle, first)
    assert_close(ours, theirs)


def test_the_first_pass_encoder_is_untouched(pisa_then_folder, tiny_base):
    """Two encoders: the first pass's is SD's own, the second's has the folder's LoRA; the
    decoder is one module."""
    plain = AutoencoderKL.from_pretrained(str(tiny_base), subfolder="vae").encoder.state_dict()
    first = pisa_then_folder.models.vae.encoder.state_dict()
    second_vae = pisa_then_folder.models.second_vae
    assert all(torch.equal(first[k], plain[k]) for k in plain)
    assert not all(torch.equal(second_vae.encoder.state_dict()[k], plain[k]) for k in plain)
    assert second_vae.decoder is pisa_then_folder.models.vae.decoder
    assert second_vae.encoder is not pisa_then_folder.models.vae.encoder
    stages = pisa_then_folder.stages(UpscaleOptions(process_size=PROCESS, second_pass=tudsr("x")))
    assert [s.encoder for s in stages] == ["first", "second"]
    assert [s.tiling for s in stages] == ["stablesr", "square"]


@pytest.mark.slow
@pytest.mark.parametrize("scale", [4, 2], ids=["M4N2", "M2N2"])
def test_tudsr_without_pisa(tiny_base, adapter_folder, adapter_folder_2, oracle, oracle_2, scale):
    """LoRA-1's folder as the first pass, LoRA-2's as the second: exactly scale x 2, each
    pass within the bar of its official script (fed what that pass was fed)."""
    second = tudsr(adapter_folder_2)
    options = UpscaleOptions(scale=scale, process_size=PROCESS, second_pass=second)
    pipe = load(tiny_base, adapter_folder, scale=scale, process_size=PROCESS, second_pass=second)
    image = noise_image(24, 20, seed=6)
    ours = pipe.upscale(image, options)
    middle, _ = pipe.run_stage(image, pipe.stages(options)[0], {}, [])
    first = omgsr_upscale(oracle, image, upscale=scale, process_size=PROCESS)
    theirs = omgsr_upscale(oracle_2, middle, upscale=2, process_size=PROCESS)
    assert ours.size == (24 * scale * 2, 20 * scale * 2)
    print(f"M{scale}N2", differences(middle, first), differences(ours, theirs))
    assert_close(middle, first)
    assert_close(ours, theirs)
    assert pipe.models.unet.merged == "second" and set(pipe.models.unet.variants) == {
        "first",
        "second",
    }


def test_a_unet_only_second_lora_keeps_the_plain_encoder(tiny_base, adapter_folder, second_lora):
    """After a folder's first pass, a UNet-only LoRA's pass encodes with SD's own encoder."""
    pipe = load(tiny_base, adapter_folder, process_size=PROCESS, second_pass=tudsr(second_lora))
    plain = AutoencoderKL.from_pretrained(str(tiny_base), subfolder="vae").encoder.state_dict()
    second = pipe.models.second_vae.encoder.state_dict()
    assert all(torch.equal(second[k], plain[k]) for k in plain)
    assert pipe.passes.family == OMGSR and pipe.passes.second.family.name == "lora"
    out = pipe.upscale(
        noise_image(20, 16, 1), UpscaleOptions(process_size=PROCESS, second_pass=tudsr(second_lora))
    )
    assert out.size == (160, 128)


def test_pisa_family_is_unchanged(pipeline):
    assert pipeline.passes.family == PISA and pipeline.models.second_vae is None
    assert pipeline.stages(UpscaleOptions())[0].tiling == "stablesr"
