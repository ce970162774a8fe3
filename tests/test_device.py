"""Device helpers: the heap that keeps freed memory, and free memory that counts it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pisa_cli.models import device

MIB = 2**20


HEAP_CHECK = """
import torch
from pisa_cli.models import device
MIB = 2**20
assert device.keep_freed_memory()
before = device.heap_free_bytes()
block = torch.ones(64 * MIB, dtype=torch.uint8)  # above glibc's default mmap threshold
del block
kept = device.heap_free_bytes() - before
assert kept >= 60 * MIB, kept  # reused by the next activation, no page faults
# the plan's free memory counts it: MemAvailable no longer does
assert device.free_memory(torch.device("cpu")) >= device.available_ram() + kept - 16 * MIB
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_stay_in_the_heap_and_count_as_free():
    if not device.keep_freed_memory():
        pytest.skip("not glibc")
    # In a process of its own: in this one, free chunks left by earlier tests can serve part
    # of the block, and the heap then grows by less than the block.
    done = subprocess.run([sys.executable, "-c", HEAP_CHECK], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_lean_resnets_give_diffusers_outputs_bit_for_bit(tiny_base):
    from pisa_cli.engine.lean import use_lean_resnets
    from pisa_cli.models.base import load_part

    vae, unet = load_part(tiny_base, "vae"), load_part(tiny_base, "unet")
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 48) * 2 - 1
    latent = torch.randn(1, 4, 16, 16)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.inference_mode():
        before = (
            vae.encode(image).latent_dist.mean,
            vae.decode(latent).sample,
            unet(latent, 1, encoder_hidden_states=cond).sample,
        )
        assert use_lean_resnets(vae) > 0 and use_lean_resnets(unet) > 0
        after = (
            vae.encode(image).latent_dist.mean,
            vae.decode(latent).sample,
            unet(latent, 1, encoder_hidden_states=cond).sample,
        )
    for ours, theirs in zip(after, before, strict=True):
        assert torch.equal(ours, theirs)
