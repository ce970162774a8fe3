"""--max-pixels is the only pixel limit, with our message: Pillow's own decompression-bomb
limit neither refuses an image our limit allows nor speaks first."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image

from pisa_cli.imaging.io import read_picture, read_size
from tests.builders import noise_image, ramp16, save_png16
from tests.fakes import FakePipeline, run_on


@pytest.fixture
def fake_model(tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"fake weights")
    return ["--weights", weights, "--base-model", "fake-base", "--device", "cpu"]


def header_only_png(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` pixels, in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b""))


def test_a_max_pixels_above_pillows_limit_is_honoured(tmp_path, fake_model, monkeypatch):
    # Pillow's limit lowered so that small images stand for 20000x10000 ones
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    inputs = tmp_path / "in"
    inputs.mkdir()
    noise_image(32, 24).save(inputs / "eight.png")
    out = tmp_path / "out"
    fake = FakePipeline()
    result = run_on(fake, "upscale", inputs, "-o", out, *fake_model, "--max-pixels", "100000")
    assert result.exit_code == 0, result.output
    assert "bomb" not in result.output and fake.calls == 1
    assert Image.MAX_IMAGE_PIXELS == 300  # Pillow's value is put back after our reads
    sixteen = tmp_path / "sixteen.png"  # the 16-bit reader's way too
    save_png16(ramp16(32, 24, 3), sixteen)
    assert read_picture(sixteen, 100000).deep and read_size(sixteen) == (32, 24)
    refused = run_on(
        None, "upscale", inputs, "-o", tmp_path / "o2", *fake_model, "--max-pixels", "100"
    )
    assert refused.exit_code == 1
    assert "768 pixels, more than --max-pixels 100" in refused.output


def test_our_message_shows_at_the_default_limit(tmp_path, fake_model):
    big = tmp_path / "big.png"
    header_only_png(big, 20000, 10000)
    result = run_on(None, "upscale", big, "-o", tmp_path / "out", *fake_model)
    assert result.exit_code == 1, result.output
    (line,) = [x for x in result.output.splitlines() if str(big) in x and "failed" in x]
    assert "20000x10000 is 200,000,000 pixels, more than --max-pixels 100,000,000" in line
    assert "bomb" not in result.output
    dry = run_on(None, "upscale", big, "-o", tmp_path / "out", *fake_model, "--dry-run")
    assert "more than --max-pixels 100,000,000" in dry.output and "bomb" not in dry.output
