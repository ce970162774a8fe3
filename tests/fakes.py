"""Fakes shared by the test modules: a pipeline that upscales with a nearest filter (no
model), and the CLI run in process on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from PIL import Image

from pisa_cli.cli import app
from tests.helpers import runner


@dataclass
class FakeResult:
    image: Image.Image
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    batch: int = 1


class FakePipeline:
    """Upscales by ``options.scale`` with a nearest filter; ``fail`` makes every image fail
    inside the model. Counts its calls; batches images of one size as the real pipeline
    does (``batches``: the sizes of the batches it was given)."""

    models = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls = 0
        self.batches: list[int] = []

    def stages(self, options) -> list:
        return []

    def describe(self, options) -> list[str]:
        return ["fake pipeline"]

    def upscale_with_info(self, image: Image.Image, options) -> FakeResult:
        self.calls += 1
        if self.fail:
            raise RuntimeError("the fake model fails on purpose")
        size = (image.width * options.scale, image.height * options.scale)
        big = image.convert("RGB").resize(size, Image.Resampling.NEAREST)
        # the output depends on the lambdas, as the model's does (resume tests see it)
        shift = round(37 * options.lambda_pix + 71 * options.lambda_sem) % 256
        stages = ("preprocess", "text", "encode", "unet", "decode", "color")
        return FakeResult(
            big.point(lambda value: (value + shift) % 256), dict.fromkeys(stages, 0.0)
        )

    def batching(self, image: Image.Image, options, requested):
        return image.size, requested or 1

    def upscale_many(self, images: list, options, requested=None) -> list:
        self.batches.append(len(images))
        outcomes: list = []
        for image in images:
            try:
                outcomes.append(self.upscale_with_info(image, options))
            except Exception as error:
                outcomes.append(error)
            else:
                outcomes[-1].batch = len(images)
        return outcomes


def run_on(pipeline: FakePipeline | None, *args: object):
    """``pisa ARGS`` in process, the CLI building ``pipeline`` (a fake) instead of the model;
    with None, any model load fails the command with 'the model was loaded'."""

    def factory(model, options):
        if pipeline is None:
            raise AssertionError("the model was loaded")
        return pipeline

    return runner.invoke(app, [str(a) for a in args], obj={"pipeline_factory": factory})


def run_fake(*args: object):
    """``pisa ARGS`` in process on a fresh FakePipeline."""
    return run_on(FakePipeline(), *args)
