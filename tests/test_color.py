"""Colour fixes and the 8-bit truncation of the reference."""

from __future__ import annotations

import torch

from pisa_cli.engine.color import adain_color_fix, color_fix, quantize, wavelet_color_fix


def images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(1, 3, 40, 56, generator=generator) * 0.5 + 0.1
    source = torch.rand(1, 3, 40, 56, generator=generator) * 0.3 + 0.4
    return target, source


def test_adain_gives_the_source_statistics():
    target, source = images()
    fixed = adain_color_fix(target, source)
    for channel in range(3):
        assert torch.isclose(fixed[0, channel].mean(), source[0, channel].mean(), atol=1e-4)
        assert torch.isclose(fixed[0, channel].std(), source[0, channel].std(), atol=1e-3)


def test_wavelet_of_an_image_against_itself_is_the_image():
    target, _ = images(1)
    assert torch.allclose(wavelet_color_fix(target, target), target, atol=1e-6)


def test_wavelet_takes_the_low_frequencies_of_the_source():
    target, _ = images(2)
    flat = torch.full_like(target, 0.3)
    fixed = wavelet_color_fix(target, flat)
    # a flat source has no detail: the result's mean is the source's, the detail the target's
    assert torch.isclose(fixed.mean(), torch.tensor(0.3), atol=0.02)
    assert (fixed - fixed.mean()).abs().mean() > 0.05


def test_none_only_clamps():
    target = torch.tensor([[-0.5, 0.25, 1.5]]).reshape(1, 1, 1, 3)
    assert color_fix("none", target, target).flatten().tolist() == [0.0, 0.25, 1.0]


def test_quantize_truncates_like_an_8bit_conversion():
    values = torch.tensor([0.0, 0.999 / 255, 1.0 / 255, 254.99 / 255, 1.0])
    assert (quantize(values) * 255).round().tolist() == [0, 0, 1, 254, 255]


def test_a_fix_does_not_depend_on_the_memory_layout():
    # a bf16 VAE on a CPU decodes channels-last; a batch's crops are NCHW: the same image
    # must get the same fix (the mean of the two layouts differed in the last bit)
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 80, 96, generator=generator)
    source = torch.rand(1, 3, 80, 96, generator=generator) * 0.3 + 0.4
    last = target.contiguous(memory_format=torch.channels_last)
    for method in ("adain", "wavelet", "none"):
        assert torch.equal(color_fix(method, last, source), color_fix(method, target, source))
