"""Tiled VAE encode and decode that give the untiled result, in bounded working memory.

The network runs layer by layer, and each layer runs over the image in bands of whole rows
(a "tile" here is a band: as wide as the image, as tall as the memory budget allows).
A band reads the rows its convolution needs above and below, so it sees exactly the
context of the untiled convolution. Each layer's output goes to a plane (RAM or a
temporary file, see planes.py) that sums its values and squares as the bands arrive, so the
next GroupNorm normalises with the mean and variance of the whole image, not of a tile: the
tone shifts of per-tile GroupNorm cannot happen. The mid-block self-attention, which sees
the whole image, runs query band by key band with an online softmax.

The arithmetic is that of diffusers' Encoder and Decoder (ResnetBlock2D, Upsample2D,
Downsample2D, the VAE's single-head Attention), using their own weights; the tests compare
the two on random weights. Compute is the same as untiled plus a row of halo per band.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pisa_cli.engine.planes import Plane, PlaneStore, RamPlane

SCORE_BUDGET = 2**24
"""Attention scores held at once (float32 values) when no fused kernel is available."""


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T scale) v, logsumexp of the scores) for (1, heads, n, dim) tensors.

    torch's fused attention kernels return the log-sum-exp that merging key bands needs;
    where none is available the scores are computed in chunks of queries.
    """
    # The CPU kernel reads strided inputs wrongly (torch 2.13): always hand it dense ones.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    try:
        if q.device.type == "cpu":
            op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            out, lse = op(q, k, v, 0.0, False, scale=scale)
            return out, lse.float()
        if q.device.type == "cuda":
            op = torch.ops.aten._scaled_dot_product_efficient_attention
            out, lse, _, _ = op(q, k, v, None, True, 0.0, False, scale=scale)
            return out, lse[..., : q.shape[2]].float()
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        pass
    return attend_reference(q, k, v, scale)


def attend_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` in plain operations, a chunk of queries at a time."""
    chunk = max(1, SCORE_BUDGET // max(1, q.shape[1] * k.shape[2]))
    outs, lses = [], []
    for start in range(0, q.shape[2], chunk):
        scores = torch.matmul(q[:, :, start : start + chunk].float(), k.float().transpose(-1, -2))
        scores = scores * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


class BandRunner:
    """Runs single layers over planes, band by band."""

    def __init__(self, store: PlaneStore, device: torch.device, dtype: torch.dtype, budget: int):
        self.store = store
        self.device = device
        self.dtype = dtype
        self.budget = max(1, budget)
        """Activation values one band may hold (per tensor)."""

    def rows(self, channels: int, width: int) -> int:
        return max(1, self.budget // max(1, channels * width))

    def _normalize(self, band: torch.Tensor, affine, act: bool) -> torch.Tensor:
        if affine is not None:
            scale, shift = affine
            # To float32 on the CPU first: MPS has no float64.
            scale = scale.float().to(band.device)[:, None, None]
            shift = shift.float().to(band.device)[:, None, None]
            band = torch.addcmul(shift, band.float(), scale).to(self.dtype)
            return F.silu(band, inplace=True) if act else band
        return F.silu(band) if act else band

    def conv(
        self,
        src: Plane,
        conv: nn.Conv2d,
        norm: nn.GroupNorm | None = None,
        act: bool = False,
        upsample: bool = False,
        extra_pad: int = 0,
        skip: Plane | None = None,
        skip_conv: nn.Module | None = None,
        skip_scale: float = 1.0,
        out: Plane | None = None,
    ) -> Plane:
        """``conv(act(norm(src)))`` (optionally on the 2x nearest upsampling of src, with
        ``extra_pad`` zero rows/columns below and right, plus ``skip_conv(skip)``), whole
        image, band by band. GroupNorm uses the statistics of the whole of ``src``."""
        kernel, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        factor = 2 if upsample else 1
        in_h, in_w = src.height * factor, src.width * factor
        out_h = (in_h + 2 * pad + extra_pad - kernel) // stride + 1
        out_w = (in_w + 2 * pad + extra_pad - kernel) // stride + 1
        if out is None:
            out = self.store.new(conv.out_channels, out_h, out_w, self.dtype)
        affine = None
        if norm is not None:
            affine = src.group_affine(norm.num_groups, norm.weight, norm.bias, norm.eps)
        weight, bias = conv.weight, conv.bias
        layout_cl = weight.is_contiguous(memory_format=torch.channels_last) and kernel > 1
        step = self.rows(max(src.channels, conv.out_channels) * factor, out_w * stride)
        for top in range(0, out_h, step):
            bottom = min(out_h, top + step)
            first, last = stride * top - pad, stride * (bottom - 1) + kernel - pad
            lo, hi = max(0, first), min(in_h, last)
            band = src.read(lo // factor, (hi - 1) // factor + 1, self.device)
            band = self._normalize(band, affine, act)
            if upsample:
                band = band.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
                band = band[:, lo - (lo // 2) * 2 : lo - (lo // 2) * 2 + (hi - lo)]
            band = F.pad(band, (pad, pad + extra_pad, lo - first, last - hi))[None]
            if layout_cl:
                band = band.contiguous(memory_format=torch.channels_last)
            result = F.conv2d(band, weight, bias, stride=stride)[0]
            if skip is not None:
                residual = skip.read(top, bottom, self.device)
                if skip_conv is not None:
                    residual = skip_conv(residual[None])[0]
                result = residual + result
                if skip_scale != 1.0:
                    result = result / skip_scale
            out.write(top, result)
        return out

    def attention(self, src: Plane, attn: nn.Module) -> Plane:
        """The VAE's self-attention block (GroupNorm, q/k/v, softmax over every position of
        the image, out projection, residual), query band by key band."""
        norm = attn.group_norm
        affine = src.group_affine(norm.num_groups, norm.weight, norm.bias, norm.eps)
        inner = attn.to_q.out_features
        keys = self.store.new(inner, src.height, src.width, self.dtype)
        values = self.store.new(inner, src.height, src.width, self.dtype)
        step = self.rows(inner * 4, src.width)  # k, v, q and the output band at once
        for top in range(0, src.height, step):
            bottom = min(src.height, top + step)
            tokens = self._tokens(src, top, bottom, affine)
            keys.write(top, attn.to_k(tokens).T.reshape(inner, bottom - top, src.width))
            values.write(top, attn.to_v(tokens).T.reshape(inner, bottom - top, src.width))
        out = self.store.new(src.channels, src.height, src.width, self.dtype)
        for top in range(0, src.height, step):
            bottom = min(src.height, top + step)
            query = attn.to_q(self._tokens(src, top, bottom, affine))
            mixed = self._softmax_mix(query, keys, values, attn.heads, attn.scale, step)
            result = attn.to_out[0](mixed.to(self.dtype)).T.reshape(-1, bottom - top, src.width)
            if attn.residual_connection:
                result = result + src.read(top, bottom, self.device)
            out.write(top, result / attn.rescale_output_factor)
        keys.release()
        values.release()
        return out

    def _tokens(self, src: Plane, top: int, bottom: int, affine) -> torch.Tensor:
        band = self._normalize(src.read(top, bottom, self.device), affine, act=False)
        return band.flatten(1).T  # (positions, channels)

    def _softmax_mix(
        self, query: torch.Tensor, keys: Plane, values: Plane, heads: int, scale: float, step: int
    ) -> torch.Tensor:
        """softmax(q k^T * scale) v over every key position, streaming keys band by band and
        merging the bands exactly through their log-sum-exp."""
        count, inner = query.shape
        dim = inner // heads
        q = query.view(1, count, heads, dim).transpose(1, 2)
        out, lse = None, None
        for top in range(0, keys.height, step):
            bottom = min(keys.height, top + step)
            k = keys.read(top, bottom, self.device).flatten(1).view(heads, dim, -1)
            v = values.read(top, bottom, self.device).flatten(1).view(heads, dim, -1)
            part, part_lse = attend(q, k.transpose(1, 2)[None], v.transpose(1, 2)[None], scale)
            if out is None:
                out, lse = part.float(), part_lse
                continue
            merged = torch.logaddexp(lse, part_lse)
            out = (
                out * torch.exp(lse - merged)[..., None]
                + part.float() * torch.exp(part_lse - merged)[..., None]
            )
            lse = merged
        assert out is not None
        return out.transpose(1, 2).reshape(count, inner)

    # --- blocks ---------------------------------------------------------------------------
    def resnet(self, x: Plane, block: nn.Module) -> Plane:
        if getattr(block, "time_emb_proj", None) is not None or block.upsample or block.downsample:
            raise ValueError("only plain VAE resnet blocks can be tiled")
        hidden = self.conv(x, block.conv1, norm=block.norm1, act=True)
        out = self.conv(
            hidden,
            block.conv2,
            norm=block.norm2,
            act=True,
            skip=x,
            skip_conv=block.conv_shortcut,
            skip_scale=block.output_scale_factor,
        )
        hidden.release()
        return out

    def mid_block(self, x: Plane, block: nn.Module) -> Plane:
        x = self._then(x, self.resnet(x, block.resnets[0]))
        for attn, resnet in zip(block.attentions, block.resnets[1:], strict=True):
            if attn is not None:
                x = self._then(x, self.attention(x, attn))
            x = self._then(x, self.resnet(x, resnet))
        return x

    @staticmethod
    def _then(old: Plane, new: Plane) -> Plane:
        """Release the layer input once its output exists."""
        old.release()
        return new


@torch.inference_mode()
def decode_tiled(vae: nn.Module, latents: torch.Tensor, runner: BandRunner) -> torch.Tensor:
    """decoder(post_quant_conv(latents)) for one (1, C, h, w) latent, band by band."""
    if getattr(vae, "post_quant_conv", None) is not None:
        latents = vae.post_quant_conv(latents.to(runner.dtype))
    decoder = vae.decoder
    x: Plane = RamPlane.wrap(latents.to(runner.dtype))
    x = runner._then(x, runner.conv(x, decoder.conv_in))
    x = runner.mid_block(x, decoder.mid_block)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = runner._then(x, runner.resnet(x, resnet))
        if block.upsamplers:
            x = runner._then(x, runner.conv(x, block.upsamplers[0].conv, upsample=True))
    conv = decoder.conv_out
    # The image comes back where the latents were, as from the untiled decoder: the colour
    # fix then meets its reference on the same device (3 channels: small beside the planes).
    out = RamPlane(conv.out_channels, x.height, x.width, runner.dtype, runner.device)
    runner.conv(x, conv, norm=decoder.conv_norm_out, act=True, out=out)
    x.release()
    return out.tensor()[None]


@torch.inference_mode()
def encode_tiled(vae: nn.Module, image: torch.Tensor, runner: BandRunner) -> torch.Tensor:
    """quant_conv(encoder(image)) (the latent moments) for one (1, 3, H, W) image."""
    encoder = vae.encoder
    x: Plane = RamPlane.wrap(image.to(runner.dtype))
    x = runner._then(x, runner.conv(x, encoder.conv_in))
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            x = runner._then(x, runner.resnet(x, resnet))
        if block.downsamplers:
            down = block.downsamplers[0]
            extra = 1 if down.padding == 0 else 0
            x = runner._then(x, runner.conv(x, down.conv, extra_pad=extra))
    x = runner.mid_block(x, encoder.mid_block)
    conv = encoder.conv_out
    out = RamPlane(conv.out_channels, x.height, x.width, runner.dtype, "cpu")
    runner.conv(x, conv, norm=encoder.conv_norm_out, act=True, out=out)
    x.release()
    moments = out.tensor()[None].to(runner.device)
    if getattr(vae, "quant_conv", None) is not None:
        moments = vae.quant_conv(moments)
    return moments
