"""An independent, deliberately plain implementation of the PiSA-SR reference inference,
used as the oracle of the pipeline tests.

It follows the reference script step by step, with none of our machinery: peft merges the
LoRAs (pixel first, then semantic, as the official evaluation does), two UNet copies give the
pixel and PiSA predictions, the tiles are walked with the reference's row/column loops and
weighted with its Gaussian formula, the image goes through PIL with truncating 8-bit
conversions, and the colour fixes are written from REFERENCE section 4. VAE latents use the
mean (the reference samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class ReferenceModels:
    unet_pix: torch.nn.Module
    unet_pisa: torch.nn.Module
    vae: torch.nn.Module
    prompt_embeds: torch.Tensor


def _merged_unet(base: Path, checkpoint: dict, branches: tuple[str, ...]) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    adapters = []
    for branch in branches:
        rank = checkpoint[f"lora_rank_unet_{branch}"]
        for group in ("encoder", "decoder", "others"):
            name = f"default_{group}_{branch}"
            modules = checkpoint[f"unet_lora_{group}_modules_{branch}"]
            unet.add_adapter(
                LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=modules),
                adapter_name=name,
            )
            adapters.append(name)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(checkpoint["state_dict_unet"][name])
    for branch in branches:  # pixel LoRAs merged first, then semantic
        for module in unet.modules():
            if isinstance(module, LoraLayer):
                names = [a for a in adapters if a.endswith(branch) and a in module.lora_A]
                if names:
                    module.merge(adapter_names=names)
    merged = {
        name.replace(".base_layer", ""): param.detach().clone()
        for name, param in unet.named_parameters()
        if "lora_" not in name
    }
    clean = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    clean.load_state_dict(merged)
    return clean.eval()


def load_reference(base: Path, pkl: Path, prompt: str = "") -> ReferenceModels:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    checkpoint = torch.load(pkl, map_location="cpu", weights_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
    ids = tokenizer(
        prompt,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        embeds = text_encoder(ids)[0]
    return ReferenceModels(
        unet_pix=_merged_unet(base, checkpoint, ("pix",)),
        unet_pisa=_merged_unet(base, checkpoint, ("pix", "sem")),
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae").eval(),
        prompt_embeds=embeds,
    )


def _gaussian(tile_width: int, tile_height: int) -> torch.Tensor:
    mid_x, mid_y = (tile_width - 1) / 2, (tile_height - 1) / 2
    xs = [
        math.exp(-((x - mid_x) ** 2) / (2 * tile_width**2 * 0.01)) / math.sqrt(2 * math.pi * 0.01)
        for x in range(tile_width)
    ]
    ys = [
        math.exp(-((y - mid_y) ** 2) / (2 * tile_height**2 * 0.01)) / math.sqrt(2 * math.pi * 0.01)
        for y in range(tile_height)
    ]
    return torch.tensor(np.outer(ys, xs), dtype=torch.float32)


def _eps(
    models: ReferenceModels,
    latents: torch.Tensor,
    default: bool,
    lambda_pix: float,
    lambda_sem: float,
) -> torch.Tensor:
    t = torch.tensor([1]).long()
    cond = models.prompt_embeds.expand(latents.shape[0], -1, -1)
    eps_pisa = models.unet_pisa(latents, t, encoder_hidden_states=cond).sample
    if default:
        return eps_pisa
    eps_pix = models.unet_pix(latents, t, encoder_hidden_states=cond).sample
    return lambda_pix * eps_pix + lambda_sem * (eps_pisa - eps_pix)


def _tiled_eps(models, latents, default, lambda_pix, lambda_sem, tile_size, overlap):
    """The reference's loop: rows walk the width, columns the height, last tile flush."""
    _, _, h, w = latents.shape
    weights = _gaussian(tile_size, tile_size)
    tile_size = min(tile_size, min(h, w))
    rows = 0
    cur = 0
    while cur < w:
        cur = max(rows * tile_size - overlap * rows, 0) + tile_size
        rows += 1
    cols = 0
    cur = 0
    while cur < h:
        cur = max(cols * tile_size - overlap * cols, 0) + tile_size
        cols += 1
    total = torch.zeros_like(latents)
    count = torch.zeros_like(latents)
    for row in range(rows):
        for col in range(cols):
            ofs_x = max(row * tile_size - overlap * row, 0)
            ofs_y = max(col * tile_size - overlap * col, 0)
            if row == rows - 1:
                ofs_x = w - tile_size
            if col == cols - 1:
                ofs_y = h - tile_size
            tile = latents[:, :, ofs_y : ofs_y + tile_size, ofs_x : ofs_x + tile_size]
            out = _eps(models, tile, default, lambda_pix, lambda_sem)
            total[:, :, ofs_y : ofs_y + tile_size, ofs_x : ofs_x + tile_size] += out * weights
            count[:, :, ofs_y : ofs_y + tile_size, ofs_x : ofs_x + tile_size] += weights
    return total / count


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def _to_pil(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray(tensor[0].mul(255).byte().permute(1, 2, 0).numpy())


def _adain(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    def stats(x):
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        return flat.mean(2)[..., None, None], (flat.var(2) + 1e-5).sqrt()[..., None, None]

    s_mean, s_std = stats(source)
    t_mean, t_std = stats(target)
    return (target - t_mean) / t_std * s_std + s_mean


def _blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]])
    kernel = kernel[None, None].repeat(3, 1, 1, 1)
    image = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(image, kernel, groups=3, dilation=radius)


def _decompose(image: torch.Tensor):
    high = torch.zeros_like(image)
    for i in range(5):
        low = _blur(image, 2**i)
        high += image - low
        image = low
    return high, low


def _wavelet(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return _decompose(target)[0] + _decompose(source)[1]


@torch.no_grad()
def reference_upscale(
    models: ReferenceModels,
    image: Image.Image,
    scale: int = 4,
    process_size: int = 512,
    lambda_pix: float = 1.0,
    lambda_sem: float = 1.0,
    default: bool = True,
    color_fix: str = "adain",
    latent_tile: int = 96,
    latent_overlap: int = 32,
) -> Image.Image:
    image = image.convert("RGB")
    ori_w, ori_h = image.size
    resized = False
    if ori_w < process_size // scale or ori_h < process_size // scale:
        f = (process_size // scale) / min(ori_w, ori_h)
        image = image.resize((int(f * ori_w), int(f * ori_h)))
        resized = True
    image = image.resize((image.size[0] * scale, image.size[1] * scale))
    image = image.resize(
        (image.width - image.width % 8, image.height - image.height % 8), Image.LANCZOS
    )
    c_t = _to_tensor(image) * 2 - 1
    sf = models.vae.config.scaling_factor
    latents = models.vae.encode(c_t).latent_dist.mean * sf
    h, w = latents.shape[-2:]
    if h * w <= latent_tile * latent_tile:
        eps = _eps(models, latents, default, lambda_pix, lambda_sem)
    else:
        eps = _tiled_eps(
            models, latents, default, lambda_pix, lambda_sem, latent_tile, latent_overlap
        )
    out = models.vae.decode((latents - eps) / sf).sample.clamp(-1, 1)
    out = _to_pil(torch.clip(out * 0.5 + 0.5, 0, 1))
    if color_fix in ("adain", "wavelet"):
        fix = _adain if color_fix == "adain" else _wavelet
        out = _to_pil(fix(_to_tensor(out), _to_tensor(image)).clamp(0, 1))
    if resized:
        out = out.resize((scale * ori_w, scale * ori_h))
    return out
