"""Helpers shared by the test modules (fixtures live in conftest): images, the tiny model's
checkpoints and LoRAs written in the real formats, running the CLI in process (on the
model or on a fake pipeline) and in a real process, 16-bit PNGs.

Test modules import helpers from here only, never from each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import png
import torch
from PIL import Image, ImageCms
from typer.testing import CliRunner

from pisa_cli.cli import app
from pisa_cli.fsutil import TEMP_PREFIX
from pisa_cli.models.synthetic import lora_target_modules
from pisa_cli.options import UpscaleOptions

REPO = Path(__file__).parents[1]


BRANCHES = ("pix", "sem")


GROUPS = ("encoder", "decoder", "others")


def write_official_checkpoint(base: Path, path: Path, rank: int = 4, seed: int = 1) -> Path:
    """A pisa_sr.pkl as the official training code saves it: peft adapters named
    default_{encoder,decoder,others}_{pix,sem} on the UNet, and a dict with ranks, module
    lists and the state dict entries whose names contain "lora"."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    groups = lora_target_modules(unet)
    torch.manual_seed(seed)
    for branch in BRANCHES:
        for group in GROUPS:
            config = LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=groups[group])
            unet.add_adapter(config, adapter_name=f"default_{group}_{branch}")
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; trained LoRAs are not
                param.normal_(0.0, 0.02)
    checkpoint: dict = {}
    for branch in BRANCHES:
        checkpoint[f"lora_rank_unet_{branch}"] = rank
        for group in GROUPS:
            checkpoint[f"unet_lora_{group}_modules_{branch}"] = list(groups[group])
    checkpoint["state_dict_unet"] = {k: v for k, v in unet.state_dict().items() if "lora" in k}
    torch.save(checkpoint, path)
    return path


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random colour image (structure at several scales, like a photo)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, height // 8), max(2, width // 8), 3))
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    fine = rng.normal(0, 12, (height, width, 3))
    array = np.clip(np.asarray(image, dtype=np.float64) + fine, 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert(mode)


def assert_close(ours: Image.Image, theirs: Image.Image, mean: float = 0.5) -> None:
    """The correctness bar: within 3/255 per pixel, mean difference under ``mean``/255.

    (Float differences of 1e-6 can flip the reference's 8-bit truncation by a level, and the
    colour fix can stretch that level by the contrast ratio of source and output.)"""
    assert ours.size == theirs.size
    diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int))
    assert diff.max() <= 3 and diff.mean() < mean, (diff.max(), diff.mean())


SECOND_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"]


def second_lora_unet(base: Path, rank: int = 8, alpha: float = 16.0, seed: int = 2):
    """The base UNet with a random second-pass LoRA attached by peft (active, unmerged)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=SECOND_TARGETS
    )
    torch.manual_seed(seed)
    unet.add_adapter(config)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return unet, config


def write_second_lora(
    base: Path,
    folder: Path,
    layout: str = "peft",
    timestep: int | None = 250,
    alpha_in_file: bool = True,
) -> Path:
    """A second-pass LoRA as peft (adapter folder) or diffusers (one .safetensors) save it."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet, config = second_lora_unet(base)
    state = get_peft_model_state_dict(unet)
    metadata = {} if timestep is None else {"timestep": str(timestep)}
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "peft":
        config.save_pretrained(folder)
        save_file(state, str(folder / "adapter_model.safetensors"), metadata=metadata)
        return folder
    from diffusers import StableDiffusionPipeline

    adapter = config.to_dict() if alpha_in_file else None
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state, unet_lora_adapter_metadata=adapter
    )
    path = folder / "pytorch_lora_weights.safetensors"
    if metadata:  # rewrite with our timestep in the header, the tensors unchanged
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            header = {**(handle.metadata() or {}), **metadata}
        save_file(tensors, str(path), metadata=header)
    return path


runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def visible(folder):
    """Names of the files in ``folder``, without hidden ones (the manifest)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def model_args(tiny_base, pisa_pkl):
    return ["--base-model", str(tiny_base), "--weights", str(pisa_pkl), "--device", "cpu"]


ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
"""An ICC profile (its bytes hold the time it was made: keep one copy)."""


def ramp16(width: int, height: int, channels: int, seed: int = 0) -> np.ndarray:
    """16-bit pixels using far more than 256 levels per channel."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 65535, width * height).reshape(height, width)
    planes = [np.roll(base, shift, axis=1) for shift in rng.integers(0, width, channels)]
    return np.stack(planes, axis=-1).astype(np.uint16)


def save_png16(array: np.ndarray, path) -> None:
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[-1]] + ";16"
    png.from_array(array.reshape(array.shape[0], -1), mode).save(str(path))


def batch_differences(color_fixes: Sequence[str]) -> dict[str, float]:
    """Per colour fix, the largest difference between four 16-bit images (two smooth, two
    ramps) upscaled in one batch and one by one, on the tiny model in bf16 on the CPU, in
    float: a 16-bit output is the colour fix's float result, so any rounding a batch changed
    shows."""
    from pisa_cli.core.random import random_pipeline
    from pisa_cli.imaging.deep import DeepImage

    pipe = random_pipeline("tiny", torch.device("cpu"), torch.bfloat16)
    smooth = [np.asarray(noise_image(24, 20, seed), dtype=np.float32) / 255 for seed in (1, 2)]
    images = [DeepImage.from_array(array) for array in smooth]
    images += [DeepImage.from_uint16(ramp16(24, 20, 3, seed=seed)) for seed in (3, 4)]
    worst = {}
    for color_fix in color_fixes:
        options = UpscaleOptions(process_size=64, color_fix=color_fix)
        batched = pipe.upscale_many(images, options, 4)
        worst[color_fix] = 0.0
        for image, result in zip(images, batched, strict=True):
            assert result.batch == 4, result
            alone = pipe.upscale(image, options).to_array()
            difference = float(np.abs(result.image.to_array() - alone).max())
            worst[color_fix] = max(worst[color_fix], difference)
    return worst


def pisa(*args: object) -> list[str]:
    return [sys.executable, "-m", "pisa_cli", "upscale", *map(str, args)]


def environment() -> dict[str, str]:
    """This checkout's code (not an installed copy), the tests' isolated caches, and one
    torch thread: on a busy two-core machine the tiny model runs many times faster so, and
    every run of a test computes the same bytes either way."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def visible_bytes(folder: Path) -> dict[str, bytes]:
    """Name -> bytes of every visible file in ``folder`` (the manifest is hidden)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def temporaries(folder: Path) -> list[Path]:
    return list(folder.glob(f"{TEMP_PREFIX}*"))


def check_partial_then_rerun(
    args: list[str], env: dict[str, str], out: Path, expected: dict[str, bytes]
) -> None:
    """What a killed run left in ``out`` is complete and right, and running ``args`` again
    does exactly the rest: the whole expected set, no temporaries."""
    partial = visible_bytes(out)
    for name, data in partial.items():
        assert data == expected[name], name
    again = subprocess.run(args, env=env, text=True, capture_output=True)
    assert again.returncode == 0, again.stderr
    done, skipped = len(expected) - len(partial), len(partial)
    assert f"{done} done, {skipped} skipped, 0 failed" in again.stderr
    assert visible_bytes(out) == expected
    assert not temporaries(out)


OMGSR_TARGETS = [
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv",
    "conv_out",
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
]
"""The target modules of OMGSR-S's training script, for both LoRAs."""


def write_adapter_folder(
    base: Path,
    folder: Path,
    seed: int = 5,
    unet_rank: int = 8,
    vae_rank: int = 4,
    vae_alpha: float = 8.0,
    std: float = 0.03,
) -> Path:
    """An OMGSR-style folder exactly as its trainer saves one: peft models with adapters
    named unet_lora_adapter and vae_encoder_lora_adapter, written by peft's own
    save_pretrained (each lands in a sub-folder named after its adapter). The UNet LoRA has
    lora_alpha = r as the official config; the encoder's has alpha 2r, so the scaling is
    read from the file. lora_B is random (peft starts it at zero; trained LoRAs are not)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig, PeftModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae")
    folder.mkdir(parents=True, exist_ok=True)
    for model, name, rank, alpha in (
        (unet, "unet_lora_adapter", unet_rank, unet_rank),
        (vae.encoder, "vae_encoder_lora_adapter", vae_rank, vae_alpha),
    ):
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=OMGSR_TARGETS, init_lora_weights="gaussian"
        )
        wrapped = PeftModel(model=model, peft_config=config, adapter_name=name)
        with torch.no_grad():
            for key, param in wrapped.named_parameters():
                if "lora_B" in key:
                    param.normal_(0.0, std)
        wrapped.save_pretrained(str(folder))
    return folder


@dataclass
class FakeResult:
    image: Image.Image
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    batch: int = 1


class FakePipeline:
    """Upscales by ``options.scale`` with a nearest filter; ``fail`` makes every image fail
    inside the model. Counts its calls; batches images of one size as the real pipeline
    does (``batches``: the sizes of the batches it was given)."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls = 0
        self.batches: list[int] = []

    def stages(self, options) -> list:
        return []

    def describe(self, options) -> list[str]:
        return ["fake pipeline"]

    def upscale_with_info(self, image: Image.Image, options) -> FakeResult:
        self.calls += 1
        if self.fail:
            raise RuntimeError("the fake model fails on purpose")
        size = (image.width * options.scale, image.height * options.scale)
        big = image.convert("RGB").resize(size, Image.Resampling.NEAREST)
        # the output depends on the lambdas, as the model's does (resume tests see it)
        shift = round(37 * options.lambda_pix + 71 * options.lambda_sem) % 256
        stages = ("preprocess", "text", "encode", "unet", "decode", "color")
        return FakeResult(
            big.point(lambda value: (value + shift) % 256), dict.fromkeys(stages, 0.0)
        )

    def batching(self, image: Image.Image, options, requested):
        return image.size, requested or 1

    def upscale_many(self, images: list, options, requested=None) -> list:
        self.batches.append(len(images))
        outcomes: list = []
        for image in images:
            try:
                outcomes.append(self.upscale_with_info(image, options))
            except Exception as error:
                outcomes.append(error)
            else:
                outcomes[-1].batch = len(images)
        return outcomes


def run_on(pipeline: FakePipeline | None, *args: object):
    """``pisa ARGS`` in process, the CLI building ``pipeline`` (a fake) instead of the model;
    with None, any model load fails the command with 'the model was loaded'."""

    def factory(model, options):
        if pipeline is None:
            raise AssertionError("the model was loaded")
        return pipeline

    return runner.invoke(app, [str(a) for a in args], obj={"pipeline_factory": factory})


def run_fake(*args: object):
    """``pisa ARGS`` in process on a fresh FakePipeline."""
    return run_on(FakePipeline(), *args)
