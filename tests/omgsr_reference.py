"""An independent, deliberately plain implementation of the OMGSR-S inference script
(github wuer5/OMGSR, infer/infer_omgsr_s.py and infer/omgsr_s_infer_model.py), the oracle of
the OMGSR-style family's tests.

It follows the script step by step with none of our machinery: peft's PeftModel loads each
adapter folder onto the UNet and onto vae.encoder and merges it (merge_and_unload), the
scheduler's alphas_cumprod gives abar_t, the formula z_H = (z_L - sqrt(1 - abar_t) eps) /
sqrt(abar_t) is written out by hand, the tiles are walked with the script's row/column
loops (x-major, each tile its own UNet call) and weighted with its Gaussian (y centre at
L / 2, float64 weights), the image goes through PIL with truncating 8-bit conversions, and
the colour fixes are PiSA's oracle's (the script's are the same StableSR functions). VAE
latents use the mean (the script samples).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.reference import _adain, _to_pil, _to_tensor, _wavelet


@dataclass
class OmgsrModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor
    prompt_embeds: torch.Tensor


def load_omgsr_reference(base: Path, lora_path: Path, prompt: str = "") -> OmgsrModels:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import PeftModel
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(str(base), subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder").eval()
    ids = tokenizer(
        prompt,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        embeds = text_encoder(ids)[0]
    vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(str(base), subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    vae.encoder = PeftModel.from_pretrained(
        vae.encoder, os.path.join(lora_path, "vae_encoder_lora_adapter")
    )
    unet = PeftModel.from_pretrained(unet, os.path.join(lora_path, "unet_lora_adapter"))
    vae.encoder.merge_and_unload()
    unet.merge_and_unload()
    return OmgsrModels(unet.eval(), vae.eval(), scheduler.alphas_cumprod, embeds)


def _gaussian_weights(tile_width: int, tile_height: int) -> torch.Tensor:
    var = 0.01
    midpoint = (tile_width - 1) / 2
    x_probs = [
        math.exp(-((x - midpoint) ** 2) / (tile_width * tile_width) / (2 * var))
        / math.sqrt(2 * math.pi * var)
        for x in range(tile_width)
    ]
    midpoint = tile_height / 2
    y_probs = [
        math.exp(-((y - midpoint) ** 2) / (tile_height * tile_height) / (2 * var))
        / math.sqrt(2 * math.pi * var)
        for y in range(tile_height)
    ]
    return torch.tensor(np.outer(y_probs, x_probs))  # float64, as the script's


def _eps(models: OmgsrModels, latents: torch.Tensor, timestep: int) -> torch.Tensor:
    return models.unet(latents, timestep, encoder_hidden_states=models.prompt_embeds).sample


def _tiled_eps(models, latents, timestep, tile_size, tile_overlap):
    _, _, h, w = latents.shape
    tile_size = min(tile_size, min(h, w))
    weights = _gaussian_weights(tile_size, tile_size)
    grid_rows, cur_x = 0, 0
    while cur_x < w:
        cur_x = max(grid_rows * tile_size - tile_overlap * grid_rows, 0) + tile_size
        grid_rows += 1
    grid_cols, cur_y = 0, 0
    while cur_y < h:
        cur_y = max(grid_cols * tile_size - tile_overlap * grid_cols, 0) + tile_size
        grid_cols += 1
    noise_pred = torch.zeros(latents.shape)
    contributors = torch.zeros(latents.shape)
    for row in range(grid_rows):
        for col in range(grid_cols):
            ofs_x = max(row * tile_size - tile_overlap * row, 0)
            ofs_y = max(col * tile_size - tile_overlap * col, 0)
            if row == grid_rows - 1:
                ofs_x = w - tile_size
            if col == grid_cols - 1:
                ofs_y = h - tile_size
            rows = slice(ofs_y, ofs_y + tile_size)
            cols = slice(ofs_x, ofs_x + tile_size)
            out = _eps(models, latents[:, :, rows, cols], timestep)
            noise_pred[:, :, rows, cols] += out * weights
            contributors[:, :, rows, cols] += weights
    return noise_pred / contributors


@torch.no_grad()
def omgsr_upscale(
    models: OmgsrModels,
    image: Image.Image,
    upscale: int = 4,
    process_size: int = 512,
    timestep: int = 273,
    align_method: str = "adain",
    tile_size: int | None = None,
    tile_overlap: int | None = None,
) -> Image.Image:
    """The script's main loop for one image; tile_size / tile_overlap None: its defaults."""
    input_image = image.convert("RGB")
    ori_width, ori_height = input_image.size
    resize_flag = False
    if ori_width < process_size // upscale or ori_height < process_size // upscale:
        scale = (process_size // upscale) / min(ori_width, ori_height)
        input_image = input_image.resize((int(scale * ori_width), int(scale * ori_height)))
        resize_flag = True
    input_image = input_image.resize((input_image.size[0] * upscale, input_image.size[1] * upscale))
    new_width = input_image.width - input_image.width % 8
    new_height = input_image.height - input_image.height % 8
    input_image = input_image.resize((new_width, new_height), Image.LANCZOS)
    tile_size = process_size // 8 if tile_size is None else tile_size
    tile_overlap = tile_size // 2 if tile_overlap is None else tile_overlap

    lq_img = _to_tensor(input_image) * 2 - 1
    sf = models.vae.config.scaling_factor
    lq_latent = models.vae.encode(lq_img).latent_dist.mean * sf
    _, _, h, w = lq_latent.shape
    if h * w <= tile_size * tile_size:
        eps = _eps(models, lq_latent, timestep)
    else:
        eps = _tiled_eps(models, lq_latent, timestep, tile_size, tile_overlap)
    alpha_t = models.alphas_cumprod[timestep]
    denoised = (lq_latent - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    out = models.vae.decode(denoised / sf).sample.clamp(-1, 1)
    output_pil = _to_pil(torch.clip(out * 0.5 + 0.5, 0, 1).float())
    if align_method in ("adain", "wavelet"):
        fix = _adain if align_method == "adain" else _wavelet
        output_pil = _to_pil(fix(_to_tensor(output_pil), _to_tensor(input_image)).clamp(0, 1))
    if resize_flag:
        output_pil = output_pil.resize((int(upscale * ori_width), int(upscale * ori_height)))
    return output_pil
