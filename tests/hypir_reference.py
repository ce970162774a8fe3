"""An independent, deliberately plain implementation of HYPIR-SD2's inference (github
XPixelGroup/HYPIR, HYPIR/enhancer/base.py and sd2.py, HYPIR/utils/common.py, test.py, as
REFERENCE section 10 describes them), the oracle of the HYPIR family's tests; and a writer
of weight files in the release's exact format.

It follows the official code with none of our machinery: diffusers' ``add_adapter`` puts a
peft LoRA (alpha = r) on the UNet and ``load_state_dict`` fills it, unmerged, as the
official loader does (demanding exactly the LoRA keys); the tiler is ``make_tiled_fn`` and
``sliding_windows`` written out (Gaussian of numpy floats, y centre H / 2, row-major
windows); the x0 step is the DDPM scheduler's ``pred_original_sample``; the image is
resized with ``F.interpolate`` and converted to 8-bit once with ``(x * 255).clamp(0, 255)``
to uint8. The VAE posterior's mean replaces the official sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tests.reference import _wavelet

LORA_MODULES = [
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_shortcut",
    "conv_out",
    "proj_in",
    "proj_out",
    "ff.net.2",
    "ff.net.0.proj",
]
"""The release's ``lora_modules`` (configs/sd2_gradio.yaml)."""


def write_hypir_weights(base: Path, path: Path, rank: int = 8, seed: int = 7) -> Path:
    """A ``HYPIR_sd2.pth`` as its trainer saves one: the LoRA entries of the UNet's
    state_dict after ``add_adapter`` (adapter ``default``, alpha = r), torch.save'd as a
    plain dict. lora_B is random (peft starts it at zero; trained LoRAs are not)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_MODULES
    )
    unet.add_adapter(config)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    state = {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@dataclass
class HypirModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor
    prompt_embeds: torch.Tensor


def prompt_embeds(base: Path, prompt: str) -> torch.Tensor:
    """The official prepare_inputs: CLIP's last hidden state of the prompt, 77 tokens."""
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(str(base), subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder").eval()
    ids = tokenizer(
        [prompt],
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def load_hypir_reference(base: Path, weight_path: Path, prompt: str = "") -> HypirModels:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    embeds = prompt_embeds(base, prompt)
    vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae").eval()
    scheduler = DDPMScheduler.from_pretrained(str(base), subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    state_dict = torch.load(weight_path, map_location="cpu", weights_only=True)
    rank = next(v.shape[0] for k, v in state_dict.items() if "lora_A" in k)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_MODULES
        )
    )
    unet.load_state_dict(state_dict, strict=False)
    required = {k for k in unet.state_dict() if "lora" in k}
    assert required == set(state_dict), "the official loader demands exactly these keys"
    return HypirModels(unet.eval(), vae, scheduler.alphas_cumprod, embeds)


def gaussian_weights(tile_width: int, tile_height: int) -> np.ndarray:
    latent_width, latent_height = tile_width, tile_height
    var = 0.01
    midpoint = (latent_width - 1) / 2
    x_probs = [
        math.exp(-(x - midpoint) * (x - midpoint) / (latent_width * latent_width) / (2 * var))
        / math.sqrt(2 * math.pi * var)
        for x in range(latent_width)
    ]
    midpoint = latent_height / 2
    y_probs = [
        math.exp(-(y - midpoint) * (y - midpoint) / (latent_height * latent_height) / (2 * var))
        / math.sqrt(2 * math.pi * var)
        for y in range(latent_height)
    ]
    return np.outer(y_probs, x_probs)


def sliding_windows(h: int, w: int, tile_size: int, tile_stride: int):
    hi_list = list(range(0, h - tile_size + 1, tile_stride))
    if (h - tile_size) % tile_stride != 0:
        hi_list.append(h - tile_size)
    wi_list = list(range(0, w - tile_size + 1, tile_stride))
    if (w - tile_size) % tile_stride != 0:
        wi_list.append(w - tile_size)
    coords = []
    for hi in hi_list:
        for wi in wi_list:
            coords.append((hi, hi + tile_size, wi, wi + tile_size))
    return coords


def make_tiled_fn(fn, size, stride, scale_type="up", scale=1, channel=None):
    def tiled_fn(x):
        if scale_type == "up":

            def scale_fn(n):
                return int(n * scale)
        else:

            def scale_fn(n):
                return int(n // scale)

        b, c, h, w = x.size()
        out_channel = channel or c
        out = torch.zeros((b, out_channel, scale_fn(h), scale_fn(w)), dtype=x.dtype)
        count = torch.zeros_like(out, dtype=torch.float32)
        weight_size = scale_fn(size)
        weights = torch.tensor(
            gaussian_weights(weight_size, weight_size)[None, None], dtype=x.dtype
        )
        for hi, hi_end, wi, wi_end in sliding_windows(h, w, size, stride):
            x_tile = x[..., hi:hi_end, wi:wi_end]
            out_hi, out_hi_end, out_wi, out_wi_end = map(scale_fn, (hi, hi_end, wi, wi_end))
            out[..., out_hi:out_hi_end, out_wi:out_wi_end] += fn(x_tile) * weights
            count[..., out_hi:out_hi_end, out_wi:out_wi_end] += weights
        return out / count

    return tiled_fn


def resize_short_edge_to(imgs: torch.Tensor, size: int) -> torch.Tensor:
    _, _, h, w = imgs.size()
    if h == w:
        new_h, new_w = size, size
    elif h < w:
        new_h, new_w = size, int(w * size / h)
    else:
        new_h, new_w = int(h * size / w), size
    return F.interpolate(imgs, size=(new_h, new_w), mode="bicubic", antialias=True)


@torch.no_grad()
def hypir_enhance(
    models: HypirModels,
    image: Image.Image,
    upscale: int = 4,
    patch_size: int = 512,
    stride: int = 256,
    model_t: int = 200,
    coeff_t: int = 200,
) -> Image.Image:
    """The official enhance() for one image (scale_by factor), PIL in, PIL out."""
    lq = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    lq = lq.permute(2, 0, 1)[None].contiguous()
    lq = F.interpolate(lq, scale_factor=upscale, mode="bicubic")
    ref = lq
    h0, w0 = lq.shape[2:]
    if min(h0, w0) <= patch_size:
        lq = resize_short_edge_to(lq, size=patch_size)
    lq = lq * 2 - 1
    h1, w1 = lq.shape[2:]
    vae_scale_factor = 8
    ph = (h1 + vae_scale_factor - 1) // vae_scale_factor * vae_scale_factor - h1
    pw = (w1 + vae_scale_factor - 1) // vae_scale_factor * vae_scale_factor - w1
    lq = F.pad(lq, (0, pw, 0, ph), mode="constant", value=0)
    sf = models.vae.config.scaling_factor

    z_lq = make_tiled_fn(
        lambda tile: models.vae.encode(tile).latent_dist.mean,
        size=patch_size,
        stride=stride,
        scale_type="down",
        scale=vae_scale_factor,
        channel=models.vae.config.latent_channels,
    )(lq)

    def generator(z):
        z_in = z * sf
        eps = models.unet(z_in, model_t, encoder_hidden_states=models.prompt_embeds).sample
        a = models.alphas_cumprod[coeff_t]
        x0 = (z_in - (1 - a) ** 0.5 * eps) / a**0.5
        return x0 / sf

    z = make_tiled_fn(generator, size=patch_size // 8, stride=stride // 8)(z_lq)
    x = make_tiled_fn(
        lambda tile: models.vae.decode(tile).sample,
        size=patch_size // 8,
        stride=stride // 8,
        scale_type="up",
        scale=vae_scale_factor,
        channel=3,
    )(z)
    x = x[..., :h1, :w1]
    x = (x + 1) / 2
    x = F.interpolate(x, size=(h0, w0), mode="bicubic", antialias=True)
    x = _wavelet(x, ref)
    out = (x * 255).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(out[0].permute(1, 2, 0).numpy())
