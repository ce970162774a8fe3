"""Builders shared by the test modules (fixtures live in conftest): images (smooth noise,
16-bit ramps and PNGs, an ICC profile) and the tiny model's weights written in the real
formats (the official PiSA-SR checkpoint, second-pass LoRAs, OMGSR adapter folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import png
import torch
from PIL import Image, ImageCms

from pisa_cli.models.synthetic import lora_target_modules

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


def save_hard_cases(folder: Path) -> None:
    """Into ``folder``: an RGBA, a grey and a 16-bit grey image, a corrupt PNG and a 64x64
    image (over --max-pixels 3000): what a mixed folder must survive."""
    rgba = noise_image(10, 8, 7).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "alpha.png")
    noise_image(9, 7, 8).convert("L").save(folder / "grey.png")
    Image.fromarray(ramp16(12, 9, 1)[..., 0]).save(folder / "deep16.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    noise_image(64, 64, 9).save(folder / "huge.png")
