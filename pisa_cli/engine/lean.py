"""A leaner forward for diffusers' ResnetBlock2D at inference: the same arithmetic, fewer
passes over memory.

diffusers' block allocates a new tensor for each SiLU, for the time-embedding add, for the
residual add, and divides the sum by ``output_scale_factor`` even when it is 1. On a CPU
these element-wise passes over 512 px activations are memory-bound and cost a third as much
as the convolutions of SD 2.1's VAE decoder. Here they run in place on tensors the block has
just made itself, and the division only when the factor is not 1. Every value is computed
by the same operations in the same order (x + y and y + x are the same float), so outputs
are bit for bit those of diffusers (tests compare them).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _eligible(block: nn.Module) -> bool:
    return (
        getattr(block, "upsample", None) is None
        and getattr(block, "downsample", None) is None
        and getattr(block, "time_embedding_norm", None) == "default"
        and isinstance(getattr(block, "nonlinearity", None), nn.SiLU)
    )


def lean_resnet_forward(
    block: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kw
) -> torch.Tensor:
    """ResnetBlock2D.forward for eval-mode inference without gradients."""
    if block.training or torch.is_grad_enabled():  # in-place ops would break autograd
        return type(block).forward(block, input_tensor, temb, *args, **kw)
    hidden = F.silu(block.norm1(input_tensor), inplace=True)
    hidden = block.conv1(hidden)
    if block.time_emb_proj is not None and temb is not None:
        if not block.skip_time_act:
            temb = F.silu(temb)
        temb = block.time_emb_proj(temb)[:, :, None, None]
    if temb is not None:  # as diffusers: added even when there is no projection
        hidden.add_(temb)
    hidden = F.silu(block.norm2(hidden), inplace=True)
    hidden = block.conv2(hidden)  # dropout: identity in eval mode
    shortcut = input_tensor if block.conv_shortcut is None else block.conv_shortcut(input_tensor)
    hidden.add_(shortcut)
    if block.output_scale_factor != 1:
        hidden.div_(block.output_scale_factor)
    return hidden


def use_lean_resnets(model: nn.Module) -> int:
    """Give every eligible ResnetBlock2D of ``model`` the lean forward; how many."""
    from diffusers.models.resnet import ResnetBlock2D

    count = 0
    for module in model.modules():
        if isinstance(module, ResnetBlock2D) and _eligible(module):
            module.forward = types.MethodType(lean_resnet_forward, module)
            count += 1
    return count
