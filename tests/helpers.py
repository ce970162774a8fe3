"""Helpers shared by test modules: a fake pipeline the CLI can load instead of the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass
class FakeResult:
    image: Image.Image
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


class FakePipeline:
    """Upscales by ``options.scale`` with a nearest filter; ``fail`` makes every image fail
    inside the model. Counts its calls."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls = 0

    def upscale_with_info(self, image: Image.Image, options) -> FakeResult:
        self.calls += 1
        if self.fail:
            raise RuntimeError("the fake model fails on purpose")
        size = (image.width * options.scale, image.height * options.scale)
        return FakeResult(image.resize(size, Image.Resampling.NEAREST))


def use_fake_pipeline(monkeypatch, pipeline: FakePipeline | None = None) -> FakePipeline:
    """Make the CLI load ``pipeline`` (a new FakePipeline by default) instead of the model."""
    import pisa_cli.core.loading

    pipeline = pipeline or FakePipeline()
    monkeypatch.setattr(pisa_cli.core.loading, "load_pipeline", lambda *args, **kwargs: pipeline)
    return pipeline


def forbid_model_loading(monkeypatch) -> None:
    """Make any model load fail the test."""
    import pisa_cli.core.loading

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pisa_cli.core.loading, "load_pipeline", load)
