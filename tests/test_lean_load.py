"""The first-run load reads the UNet and VAE straight into the compute dtype, merging the
LoRAs per tensor: it never holds a float32 copy of the whole UNet, and its weights are
those of the float32-merge-then-cast load, bit for bit."""

from __future__ import annotations

import weakref

import pytest
import torch

from pisa_cli import load_pipeline
from pisa_cli.models import streamed
from pisa_cli.models.base import load_part
from pisa_cli.models.checkpoint import load_checkpoint
from pisa_cli.models.lora import PisaUNet, checkpoint_adapters


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PISA_CACHE_DIR", str(tmp_path / "cache"))


def _float_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(
        t.numel() * t.element_size() for t in module.state_dict().values() if t.dtype == dtype
    )


def test_bf16_load_never_holds_a_float32_unet(tiny_base, pisa_pkl, monkeypatch):
    """Float32 weights alive at once during the build, counted at every tensor read: at
    most one tensor's worth, never the UNet's (the old load built it whole in float32)."""
    import diffusers

    live: list[weakref.ref] = []
    peak = {"float32": 0}
    original = streamed.read_tensors

    def counting(path):
        for name, tensor in original(path):
            live.append(weakref.ref(tensor))
            alive = [t() for t in live if t() is not None and t().dtype == torch.float32]
            peak["float32"] = max(peak["float32"], sum(t.numel() * 4 for t in alive))
            del alive
            yield name, tensor

    monkeypatch.setattr(streamed, "read_tensors", counting)

    def no_float32_unet(*args, **kwargs):
        raise AssertionError("the UNet was built by diffusers in float32")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", no_float32_unet)
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", no_float32_unet)
    pipeline = load_pipeline(
        weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu", dtype="bf16"
    )
    unet = pipeline.models.unet.unet
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipeline.models.vae.parameters()} == {torch.bfloat16}
    largest = max(t.numel() * 4 for t in unet.state_dict().values())
    # one tensor read at a time (two while the next is read); the whole UNet is far more
    assert 0 < peak["float32"] <= 2 * largest < _float_bytes(unet, torch.bfloat16) * 2


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("merged", ["pisa", "pix"])
def test_streamed_merge_equals_float32_merge_then_cast(tiny_base, pisa_pkl, dtype, merged):
    """Weights merged while loading equal the old float32 merge cast afterwards, bit for bit."""
    from pisa_cli.core.loading import PipelineSpec, build
    from pisa_cli.options import ModelOptions

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = ModelOptions(
        weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu", dtype=dtype
    )
    lean = build(PipelineSpec(model, merged)).models.unet.unet.state_dict()
    old = PisaUNet(
        load_part(tiny_base, "unet"), checkpoint_adapters(load_checkpoint(pisa_pkl)), merged
    )
    old.to("cpu", torch_dtype)
    reference = old.unet.state_dict()
    assert lean.keys() == reference.keys()
    for name, tensor in reference.items():
        assert lean[name].dtype == torch_dtype
        assert torch.equal(lean[name], tensor), name


def test_unreadable_weights_name_the_file(tiny_base, tmp_path):
    from pisa_cli.errors import ModelError
    from pisa_cli.models.base import part_skeleton

    broken = tmp_path / "unet.safetensors"
    data = (tiny_base / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"unet\.safetensors"):
        streamed.load_streamed(part_skeleton(tiny_base, "unet"), broken, torch.bfloat16)


def test_a_pickle_that_is_not_one_names_the_file(tiny_base, tmp_path):
    from pisa_cli.errors import ModelError
    from pisa_cli.models.base import part_skeleton

    broken = tmp_path / "diffusion_pytorch_model.bin"
    broken.write_bytes(b"weights as a pickle, but not")
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model\.bin"):
        streamed.load_streamed(part_skeleton(tiny_base, "vae"), broken, torch.bfloat16)


def test_cast_before_the_move(tiny_base, pisa_pkl):
    """A float32 UNet (diffusers' loader, the fallback) bound for a bf16 device is cast
    where it is, then moved: it never lands on the device in float32."""
    unet = load_part(tiny_base, "unet")
    calls = []
    original = unet.to

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    unet.to = recording
    PisaUNet(unet, checkpoint_adapters(load_checkpoint(pisa_pkl))).to("cpu", torch.bfloat16)
    assert calls[0] == {"dtype": torch.bfloat16} and calls[1] == {"device": "cpu"}


def test_an_older_layout_loads_through_diffusers(tiny_base, pisa_pkl, tmp_path, monkeypatch):
    """Names the model does not have as stored (a layout diffusers converts while loading):
    the streamed load steps aside, and the float32 load merges as before, same weights."""
    from safetensors.torch import load_file, save_file

    from pisa_cli.models.base import part_skeleton

    path = tmp_path / "unet.safetensors"
    tensors = load_file(str(tiny_base / "unet" / "diffusion_pytorch_model.safetensors"))
    tensors["renamed.weight"] = tensors.pop("conv_in.weight")
    save_file(tensors, str(path))
    assert streamed.load_streamed(part_skeleton(tiny_base, "unet"), path, torch.bfloat16) is None

    def load(cache):
        monkeypatch.setenv("PISA_CACHE_DIR", str(tmp_path / cache))
        pipeline = load_pipeline(
            weights=str(pisa_pkl), base_model=str(tiny_base), device="cpu", dtype="bf16"
        )
        return pipeline.models.unet.unet.state_dict(), pipeline.models.vae.state_dict()

    lean = load("lean")
    monkeypatch.setattr(streamed, "load_streamed", lambda *args: None)
    old = load("old")
    for ours, theirs in zip(lean, old, strict=True):
        assert all(
            torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours
        )
