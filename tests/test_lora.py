"""LoRA merging and the side path, against peft's own (unmerged) LoRA layers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pisa_cli.errors import WeightsError
from pisa_cli.models.base import load_part
from pisa_cli.models.checkpoint import PisaCheckpoint, load_checkpoint
from pisa_cli.models.lora import PisaUNet, checkpoint_adapters, lora_delta
from tests.helpers import environment


def peft_unet(base, pkl, branches):
    """The UNet with the official adapters attached by peft, active and unmerged."""
    from peft import LoraConfig

    raw = torch.load(pkl, weights_only=True)
    unet = load_part(base, "unet")
    names = []
    for branch in branches:
        for group in ("encoder", "decoder", "others"):
            name = f"default_{group}_{branch}"
            config = LoraConfig(
                r=raw[f"lora_rank_unet_{branch}"],
                init_lora_weights="gaussian",
                target_modules=raw[f"unet_lora_{group}_modules_{branch}"],
            )
            unet.add_adapter(config, adapter_name=name)
            names.append(name)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(raw["state_dict_unet"][name])
    unet.set_adapters(names)
    return unet.eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 24, generator=generator)
    cond = torch.randn(1, 77, 16, generator=generator)
    return latents, cond


def peft_eps(unet, latents, cond):
    with torch.no_grad():
        t = torch.tensor([1])
        return unet(latents, t, encoder_hidden_states=cond.expand(len(latents), -1, -1)).sample


def test_delta_matches_peft(tiny_base, pisa_pkl):
    from peft.tuners.lora import LoraLayer

    unet = peft_unet(tiny_base, pisa_pkl, ("sem",))
    checkpoint = load_checkpoint(pisa_pkl)
    modules = dict(unet.named_modules())
    kinds = set()
    for layer in checkpoint.layers("sem"):
        peft_layer = modules[layer.module]
        assert isinstance(peft_layer, LoraLayer)
        adapter = next(a for a in peft_layer.lora_A if a.endswith("_sem"))
        expected = peft_layer.get_delta_weight(adapter)
        ours = lora_delta(layer, peft_layer.get_base_layer().weight)
        assert torch.allclose(ours, expected, atol=1e-6), layer.module
        kinds.add(tuple(expected.shape[2:]))
    assert {(), (1, 1), (3, 3)} <= kinds  # linear, 1x1 conv and 3x3 conv all checked


@pytest.mark.parametrize("merged", ["pix", "pisa"])
def test_merged_and_side_path_equal_the_unmerged_lora_forward(tiny_base, pisa_pkl, inputs, merged):
    latents, cond = inputs
    expected = {
        "pix": peft_eps(peft_unet(tiny_base, pisa_pkl, ("pix",)), latents, cond),
        "pisa": peft_eps(peft_unet(tiny_base, pisa_pkl, ("pix", "sem")), latents, cond),
    }
    assert (expected["pix"] - expected["pisa"]).abs().max() > 1e-2  # the LoRAs matter
    unet = PisaUNet(
        load_part(tiny_base, "unet"), checkpoint_adapters(load_checkpoint(pisa_pkl)), merged=merged
    )
    with torch.no_grad():
        both = unet(latents, cond, ("pix", "pisa"))
        alone = {v: unet(latents, cond, (v,)) for v in ("pix", "pisa")}
    for index, variant in enumerate(("pix", "pisa")):
        batch = both[index * 2 : index * 2 + 2]
        assert torch.allclose(batch, expected[variant], atol=1e-4), variant
        assert torch.allclose(alone[variant], expected[variant], atol=1e-4), variant
    assert unet.calls == 3


def test_switching_variants_never_changes_the_weights(tiny_base, pisa_pkl, inputs):
    latents, cond = inputs
    unet = PisaUNet(
        load_part(tiny_base, "unet"), checkpoint_adapters(load_checkpoint(pisa_pkl)), merged="pisa"
    )
    before = {k: v.clone() for k, v in unet.unet.state_dict().items()}
    with torch.no_grad():
        first = unet(latents, cond, ("pisa",))
        unet(latents, cond, ("pix",))
        unet(latents, cond, ("pix", "pisa"))
        unet(latents[:1], cond, ("pisa", "pix"))
        again = unet(latents, cond, ("pisa",))
    after = unet.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(first, again)


def test_merge_changes_exactly_the_lora_modules(tiny_base, pisa_pkl):
    checkpoint = load_checkpoint(pisa_pkl)
    plain = load_part(tiny_base, "unet").state_dict()
    merged = PisaUNet(
        load_part(tiny_base, "unet"), checkpoint_adapters(checkpoint), merged="pix"
    ).unet.state_dict()
    targets = {f"{layer.module}.weight" for layer in checkpoint.layers("pix")}
    changed = {k for k in plain if not torch.equal(plain[k], merged[k])}
    assert changed == targets


def _with_module(checkpoint: PisaCheckpoint, old: str, new: str) -> PisaCheckpoint:
    modules = {
        a: tuple(new if m == old else m for m in names) for a, names in checkpoint.modules.items()
    }
    tensors = {k.replace(f"{old}.lora", f"{new}.lora"): v for k, v in checkpoint.tensors.items()}
    return PisaCheckpoint(checkpoint.ranks, checkpoint.alphas, modules, tensors, "w.pkl")


def test_unknown_module_is_named(tiny_base, pisa_pkl):
    checkpoint = load_checkpoint(pisa_pkl)
    first = checkpoint.modules["default_encoder_pix"][0]
    broken = _with_module(checkpoint, first, "down_blocks.9.nothing")
    with pytest.raises(
        WeightsError, match=r"w\.pkl: LoRA module 'down_blocks\.9\.nothing' does not exist"
    ):
        PisaUNet(load_part(tiny_base, "unet"), checkpoint_adapters(broken))


def test_wrong_shape_is_named(tiny_base, pisa_pkl):
    checkpoint = load_checkpoint(pisa_pkl)
    linear = next(layer for layer in checkpoint.layers("pix") if layer.down.dim() == 2)
    conv = next(layer for layer in checkpoint.layers("pix") if layer.down.dim() == 4)
    broken = _with_module(checkpoint, linear.module, conv.module + "_x")
    broken = _with_module(broken, conv.module + "_x", conv.module)  # linear LoRA on a conv
    with pytest.raises(WeightsError, match=conv.module.replace(".", r"\.")):
        PisaUNet(load_part(tiny_base, "unet"), checkpoint_adapters(broken))


@pytest.mark.parametrize(("dtype", "sizes"), [(torch.bfloat16, [1, 1, 1, 1]), (torch.float32, [4])])
def test_in_bf16_on_the_cpu_a_batch_runs_sample_by_sample(
    tiny_base, pisa_pkl, inputs, dtype, sizes
):
    """bf16 kernels round differently by batch size (measured on SD 2.1's UNet: 0.02), so on
    the CPU each sample runs alone, with its own side paths, and comes out as it would in
    a call of its own; fp32 keeps the batch."""
    latents, cond = inputs
    unet = PisaUNet(
        load_part(tiny_base, "unet").to(dtype),
        checkpoint_adapters(load_checkpoint(pisa_pkl)),
        "pix",
    )
    seen: list[int] = []
    forward = unet.forward
    unet.forward = lambda x, *a, **k: (seen.append(len(x)), forward(x, *a, **k))[1]
    latents, cond = latents.to(dtype), cond.to(dtype)
    with torch.inference_mode():
        both = unet(latents, cond, ("pix", "pisa"))
        assert seen == sizes and unet.calls == 1
        for index, variant in enumerate(("pix", "pisa")):
            for sample in range(2):
                alone = unet(latents[sample : sample + 1], cond, (variant,))
                ours = both[index * 2 + sample]
                if dtype == torch.float32:  # batched: float noise only
                    assert torch.allclose(ours, alone[0], atol=1e-5), (variant, sample)
                else:
                    assert torch.equal(ours, alone[0]), (variant, sample)


SIGNS = (
    "from types import SimpleNamespace; from pisa_cli.models.lora import PisaUNet, "
    "VARIANT_ADAPTERS as V; print(*PisaUNet.signs(SimpleNamespace(variants=V, merged='pisa'), "
    "'second'))"
)


def test_side_paths_add_up_in_one_order_whatever_the_hash_seed():
    # the side paths' outputs are summed in the order of the signs; it was a set's, which
    # follows the process's string hash seed: a PiSA-SR first pass with a second-pass LoRA
    # (PiSA's two LoRAs taken away, the second's added) came out one way or the other
    from types import SimpleNamespace

    from pisa_cli.models.lora import VARIANT_ADAPTERS

    seed = 1 if list({"pix", "sem"}) == ["pix", "sem"] else 0  # one ordering them otherwise
    env = {**environment(), "PYTHONHASHSEED": str(seed)}
    there = subprocess.run(
        [sys.executable, "-c", SIGNS], env=env, capture_output=True, text=True, timeout=120
    )
    here = PisaUNet.signs(SimpleNamespace(variants=VARIANT_ADAPTERS, merged="pisa"), "second")
    assert list(here) == there.stdout.split() == ["second", "pix", "sem"], there.stderr
