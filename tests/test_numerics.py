"""Precision recovery: the fp32 redo of each stage hands the next stage what it expects, a
stage still not finite in fp32 fails its image (nothing written, nothing recorded), and
an overflow is seen before a clamp hides it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pisa_cli import load_pipeline
from pisa_cli.batch.runner import run_jobs
from pisa_cli.engine import vae as vae_module
from pisa_cli.errors import NonFiniteError, OutOfMemoryError
from pisa_cli.imaging.manifest import MANIFEST_NAME, Manifest
from pisa_cli.options import BatchOptions, UpscaleOptions
from tests.builders import noise_image
from tests.helpers import model_args, run
from tests.test_runner import make_inputs

OPTIONS = UpscaleOptions(process_size=64)
STAGES = {
    "encoder": lambda pipe: pipe.models.vae.encoder.conv_out,
    "unet": lambda pipe: pipe.models.unet.unet.conv_out,
    "decoder": lambda pipe: pipe.models.vae.decoder.conv_out,
}
NOTES = {"encoder": "VAE encoder", "unet": "UNet", "decoder": "VAE decoder"}


@pytest.fixture(scope="module")
def bf16_pipeline(tiny_base, pisa_pkl):
    return load_pipeline(
        weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu", dtype="bf16"
    )


def poisoned(module, low_only: bool):
    """A hook making ``module``'s output NaN (only below fp32 with ``low_only``)."""

    def hook(_module, _args, output):
        if low_only and output.dtype == torch.float32:
            return output
        return output * float("nan")

    return module.register_forward_hook(hook)


def dtypes(pipe) -> set[torch.dtype]:
    return {
        next(pipe.models.vae.parameters()).dtype,
        *(p.dtype for p in pipe.models.unet.unet.parameters()),
    }


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_fp32_redo_hands_the_next_stage_what_it_expects(bf16_pipeline, stage):
    """Issue 19.1: the encoder's redo gave the bf16 UNet fp32 latents (a dtype error);
    issue 20.8: a NaN eps was never checked (a black image with a decoder note)."""
    handle = poisoned(STAGES[stage](bf16_pipeline), low_only=True)
    try:
        result = bf16_pipeline.upscale_with_info(noise_image(40, 32, 5), OPTIONS)
    finally:
        handle.remove()
    assert f"{NOTES[stage]} gave inf/NaN in bfloat16; redone in fp32" in result.notes
    assert len(result.notes) == 1, result.notes  # no other stage saw a NaN
    assert np.asarray(result.image).std() > 10  # a real image, not a black one
    assert dtypes(bf16_pipeline) == {torch.bfloat16}  # both models back in bf16


def test_an_encoder_redo_in_a_batch_runs_its_images_alone(bf16_pipeline):
    handle = poisoned(STAGES["encoder"](bf16_pipeline), low_only=True)
    try:
        images = [noise_image(24, 20, seed) for seed in range(2)]
        results = bf16_pipeline.upscale_many(images, OPTIONS, 2)
    finally:
        handle.remove()
    for result in results:
        assert not isinstance(result, Exception), result
        assert "VAE encoder gave inf/NaN in bfloat16; redone in fp32" in result.notes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_not_finite_even_in_fp32_fails_its_image(pipeline, bf16_pipeline, stage, precision):
    """Issue 19.2: damaged weights gave an all-black image, called done."""
    pipe = pipeline if precision == "fp32" else bf16_pipeline
    handle = poisoned(STAGES[stage](pipe), low_only=False)
    try:
        with pytest.raises(NonFiniteError, match=f"the {NOTES[stage]} gave inf/NaN even in fp32"):
            pipe.upscale(noise_image(24, 20, 5), OPTIONS)
        if precision == "fp32":  # a batch in bf16 on a CPU runs one by one anyway
            batched = pipe.upscale_many([noise_image(24, 20, s) for s in range(2)], OPTIONS, 2)
            assert all(isinstance(result, NonFiniteError) for result in batched)
    finally:
        handle.remove()
    assert dtypes(pipe) == {pipe.models.dtype}


def test_an_encoder_overflowing_in_fp32_too_fails_with_damaged_weights(bf16_pipeline):
    """The issue's recipe: encoder.conv_in.weight scaled by 1e25 (inf/NaN in fp32 too)."""
    weight = bf16_pipeline.models.vae.encoder.conv_in.weight
    kept = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1e25)
        with pytest.raises(NonFiniteError, match="weights are likely damaged"):
            bf16_pipeline.upscale(noise_image(40, 32, 5), OPTIONS)
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert dtypes(bf16_pipeline) == {torch.bfloat16}


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_a_decoder_overflow_is_seen_before_the_clamp(pipeline, monkeypatch, value):
    """Issue 20.8: inf came out of the clamp as +-1 and passed as a finite image."""

    class Decoded:
        def __init__(self, sample):
            self.sample = sample

    def overflowing(latents):
        sample = torch.zeros(latents.shape[0], 3, latents.shape[2] * 8, latents.shape[3] * 8)
        sample[..., 0, 0] = value
        return Decoded(sample)

    monkeypatch.setattr(pipeline.models.vae, "decode", overflowing)
    decoded = vae_module.decode(pipeline.models.vae, torch.zeros(1, 4, 4, 4))
    assert not torch.isfinite(decoded[..., 0, 0]).any() and decoded[..., 1:, :].eq(0).all()
    with pytest.raises(NonFiniteError, match="VAE decoder gave inf/NaN even in fp32"):
        pipeline.upscale(noise_image(24, 20, 1), OPTIONS)


def test_an_encoder_overflow_is_seen_before_the_logvar_clamp(pipeline, monkeypatch):
    class Dist:
        def __init__(self, parameters):
            self.parameters = parameters

    class Encoded:
        def __init__(self, parameters):
            self.latent_dist = Dist(parameters)

    def overflowing(image):
        moments = torch.zeros(image.shape[0], 8, image.shape[2] // 8, image.shape[3] // 8)
        moments[:, 4:] = float("inf")  # the log variance only: the mean is fine
        return Encoded(moments)

    monkeypatch.setattr(pipeline.models.vae, "encode", overflowing)
    latent = vae_module.encode(pipeline.models.vae, torch.zeros(1, 3, 16, 16), sample=True)
    assert not torch.isfinite(latent).any()


class _FailingConversion:
    """An out-of-memory error part way through the next conversion of ``module``."""

    def __init__(self, monkeypatch, module, error=None):
        self.error = error or RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        self.armed = True
        original = module._apply

        def apply(fn, *args, **kwargs):
            if self.armed:
                self.armed = False
                raise self.error
            return original(fn, *args, **kwargs)

        monkeypatch.setattr(module, "_apply", apply)


@pytest.mark.parametrize("stage", ["decoder", "unet"])
def test_running_out_of_memory_while_converting_to_fp32_leaves_the_model_whole(
    bf16_pipeline, monkeypatch, stage
):
    """Issue 20.7: the VAE was converted outside the try; a conversion cut short left it
    half fp32 and every later image failed with a dtype mismatch."""
    module = STAGES[stage](bf16_pipeline)  # converted after most of the model's layers
    expected = np.asarray(bf16_pipeline.upscale(noise_image(24, 20, 6), OPTIONS))
    handle = poisoned(module, low_only=True)
    failing = _FailingConversion(monkeypatch, module)
    try:
        with pytest.raises(OutOfMemoryError, match=f"converting the {NOTES[stage]} to fp32"):
            bf16_pipeline.upscale(noise_image(24, 20, 5), OPTIONS)
    finally:
        handle.remove()
    assert not failing.armed
    assert dtypes(bf16_pipeline) == {torch.bfloat16}
    after = np.asarray(bf16_pipeline.upscale(noise_image(24, 20, 6), OPTIONS))
    assert np.array_equal(after, expected)  # the next image as if nothing happened


def test_an_image_not_finite_fails_alone_and_is_not_recorded(pipeline, tmp_path):
    """A white input's encoder output made NaN in every dtype: it fails with one line,
    nothing written or recorded; the images around it, in the same batch, are done."""
    jobs = make_inputs(tmp_path / "in", 3, size=(24, 20))
    white = jobs[1].source
    noise_image(24, 20).point(lambda _v: 255).save(white)

    def hook(_module, args, output):
        white = args[0].amin(dim=(1, 2, 3)) > 0.99  # per sample: a batch holds all three
        return torch.where(white[:, None, None, None], float("nan"), output)

    handle = pipeline.models.vae.encoder.conv_in.register_forward_hook(hook)
    manifest = Manifest(tmp_path / "out", {"a": 1})
    try:
        batch = BatchOptions(image_batch=3)
        results = list(run_jobs(pipeline, jobs, OPTIONS, batch, manifest=manifest))
    finally:
        handle.remove()
    assert [result.status for result in results] == ["done", "failed", "done"]
    assert results[1].error.count("\n") == 0 and str(white) in results[1].error
    assert "VAE encoder gave inf/NaN even in fp32" in results[1].error
    assert "damaged" in results[1].error
    assert jobs[0].output.exists() and not jobs[1].output.exists() and jobs[2].output.exists()
    lines = (tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()
    recorded = [json.loads(line)["output"] for line in lines]
    assert len(recorded) == 2 and not any(jobs[1].output.name in r for r in recorded)


@pytest.mark.slow  # loads the model through the CLI: 3-4 s
def test_nan_weights_fail_every_image_with_one_line_and_record_nothing(
    tiny_base, pisa_pkl, tmp_path
):
    """Issue 19.2 from the command line: a checkpoint with a NaN lora_B ran to black
    images, called done, exit 0, recorded as up to date."""
    checkpoint = torch.load(pisa_pkl, weights_only=True)
    name = next(k for k in checkpoint["state_dict_unet"] if "lora_B" in k and "pix" in k)
    checkpoint["state_dict_unet"][name] = torch.full_like(
        checkpoint["state_dict_unet"][name], float("nan")
    )
    damaged = tmp_path / "nan-lora.pkl"
    torch.save(checkpoint, damaged)
    photos, out = tmp_path / "in", tmp_path / "out"
    make_inputs(photos, 2, size=(24, 20))
    result = run("upscale", photos, "-o", out, *model_args(tiny_base, damaged))
    assert result.exit_code == 1, result.output
    failures = [line for line in result.output.splitlines() if "likely damaged" in line]
    assert len(failures) == 2, result.output
    assert "Traceback" not in result.output
    written = [p for p in out.iterdir() if p.name != MANIFEST_NAME] if out.exists() else []
    assert written == []
    manifest = out / MANIFEST_NAME
    assert not manifest.exists() or manifest.read_text().strip() == ""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sweep_points_not_finite_fail_the_image_and_a_redo_holds(
    pipeline, bf16_pipeline, precision
):
    """The sweep's points go through the same guard: a decoder inf/NaN in fp32 fails the
    image; in bf16 alone it is redone, batched points included."""
    from pisa_cli.sweep.core import Sweeper
    from pisa_cli.sweep.grid import GridPoint

    pipe = pipeline if precision == "fp32" else bf16_pipeline
    points = [GridPoint(1.0, 1.0), GridPoint(1.0, 0.5)]
    sweeper = Sweeper(pipe, OPTIONS, image_batch=2)
    prepared = sweeper.prepare(noise_image(24, 20, 3))
    handle = poisoned(STAGES["decoder"](pipe), low_only=precision == "bf16")
    try:
        if precision == "fp32":
            with pytest.raises(NonFiniteError, match="VAE decoder gave inf/NaN even in fp32"):
                list(sweeper.images(prepared, points))
        else:
            images = dict(sweeper.images(prepared, points))
            assert all(np.asarray(image).std() > 10 for image in images.values())
            assert "VAE decoder gave inf/NaN in bfloat16; redone in fp32" in prepared.notes
    finally:
        handle.remove()
    assert dtypes(pipe) == {pipe.models.dtype}
