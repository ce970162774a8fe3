"""Every image mode through the runner and the tiny model: file in, file out."""

from __future__ import annotations

import numpy as np
import png
import pytest
import tifffile
from PIL import Image, ImageOps

from pisa_cli import UpscaleOptions
from pisa_cli.batch.runner import run_jobs
from pisa_cli.imaging.discover import Job
from pisa_cli.options import BatchOptions, WriteOptions
from tests.builders import ICC, noise_image, ramp16, save_png16

OPTIONS = UpscaleOptions(process_size=32)


def upscale_file(pipeline, source, output, **write):
    batch = BatchOptions(write=WriteOptions(**write))
    [result] = list(run_jobs(pipeline, [Job(source, output)], OPTIONS, batch))
    assert result.status == "done", result.error
    return result


def test_rgb_output_is_the_pipelines(pipeline, tmp_path):
    image = noise_image(24, 20, 1)
    image.save(tmp_path / "a.png")
    upscale_file(pipeline, tmp_path / "a.png", tmp_path / "out.png")
    expected = pipeline.upscale(image, OPTIONS)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected))


def test_rgba_colour_goes_through_the_model_and_alpha_around_it(pipeline, tmp_path):
    image = noise_image(24, 20, 2).convert("RGBA")
    alpha = np.repeat(np.array([0, 128, 255], dtype=np.uint8), 8)[None].repeat(20, axis=0)
    image.putalpha(Image.fromarray(alpha))  # transparent, half, opaque thirds
    image.save(tmp_path / "a.png")
    upscale_file(pipeline, tmp_path / "a.png", tmp_path / "out.png")
    out = Image.open(tmp_path / "out.png")
    assert out.mode == "RGBA" and out.size == (96, 80)
    expected_alpha = Image.fromarray(alpha).resize((96, 80), Image.Resampling.LANCZOS)
    got = np.asarray(out.getchannel("A"))
    assert np.array_equal(got, np.asarray(expected_alpha))
    # away from the edges (Lanczos reaches 3 input pixels) every value is the input's
    assert (got[:, :20] == 0).all() and (got[:, 44:52] == 128).all() and (got[:, 76:] == 255).all()
    colour = pipeline.upscale(image.convert("RGB"), OPTIONS)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(colour))


def test_palette_with_transparency_keeps_it(pipeline, tmp_path):
    image = noise_image(24, 20, 3).convert("P")
    key = int(np.asarray(image)[0, 0])
    image.save(tmp_path / "p.png", transparency=key)
    upscale_file(pipeline, tmp_path / "p.png", tmp_path / "out.png")
    out = Image.open(tmp_path / "out.png")
    assert out.mode == "RGBA" and np.asarray(out.getchannel("A")).min() == 0


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grey_stays_grey(pipeline, tmp_path, mode):
    noise_image(24, 20, 4).convert(mode).save(tmp_path / "g.png")
    upscale_file(pipeline, tmp_path / "g.png", tmp_path / "out.png")
    out = Image.open(tmp_path / "out.png")
    assert out.mode == mode and out.size == (96, 80)


def test_16bit_grey_output_has_more_than_256_levels(pipeline, tmp_path):
    Image.fromarray(ramp16(24, 20, 1)[..., 0]).save(tmp_path / "g16.png")
    result = upscale_file(pipeline, tmp_path / "g16.png", tmp_path / "out.png")
    assert result.input_mode == "I;16"
    out = Image.open(tmp_path / "out.png")
    assert out.mode == "I;16" and out.size == (96, 80)
    assert len(np.unique(np.asarray(out))) > 256


def test_16bit_input_is_not_truncated_to_8_bits(pipeline, tmp_path):
    # A ramp over 200 of the 65536 levels: at 8 bits it would be one step between two levels
    # (mean near 29,980); the colour fix gives the output the mean of the float input.
    ramp = np.tile(np.linspace(30000, 30200, 24), (20, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "narrow.png")
    upscale_file(pipeline, tmp_path / "narrow.png", tmp_path / "out.png")
    out = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.float64)
    assert abs(out.mean() - ramp.mean()) < 15, out.mean()
    assert out.std() > 10


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_colour_png_stays_16bit(pipeline, tmp_path, channels):
    values = ramp16(24, 20, channels, seed=channels)
    save_png16(values, tmp_path / "c16.png")
    upscale_file(pipeline, tmp_path / "c16.png", tmp_path / "out.png")
    width, height, rows, info = png.Reader(filename=str(tmp_path / "out.png")).read_flat()
    assert (width, height, info["bitdepth"], info["planes"]) == (96, 80, 16, channels)
    out = np.asarray(rows).reshape(80, 96, channels)
    assert all(len(np.unique(out[..., c])) > 256 for c in range(3))
    if channels == 4:
        alpha = Image.fromarray(values[..., 3].astype(np.float32) / 65535)
        expected = np.asarray(alpha.resize((96, 80), Image.Resampling.LANCZOS))
        assert np.abs(out[..., 3] - np.clip(expected, 0, 1) * 65535).max() <= 0.5


def test_16bit_tiff_stays_16bit_tiff(pipeline, tmp_path):
    tifffile.imwrite(tmp_path / "t.tif", ramp16(24, 20, 3), photometric="rgb")
    upscale_file(pipeline, tmp_path / "t.tif", tmp_path / "out.tif")
    out = tifffile.imread(tmp_path / "out.tif")
    assert out.dtype == np.uint16 and out.shape == (80, 96, 3)
    assert len(np.unique(out[..., 0])) > 256


def test_exif_rotated_input_comes_out_upright(pipeline, tmp_path):
    upright = noise_image(20, 24, 5)  # portrait, as the camera saw it
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # landscape, as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x013B] = "Someone"
    stored.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    upscale_file(pipeline, tmp_path / "r.jpg", tmp_path / "out.jpg", quality=100)
    out = Image.open(tmp_path / "out.jpg")
    assert out.size == (80, 96)  # portrait
    assert out.getexif().get(0x0112, 1) == 1 and out.getexif()[0x013B] == "Someone"
    as_read = ImageOps.exif_transpose(Image.open(tmp_path / "r.jpg")).convert("RGB")
    expected = np.asarray(pipeline.upscale(as_read, OPTIONS), dtype=int)
    assert np.abs(np.asarray(out, dtype=int) - expected).mean() < 3  # JPEG at quality 100


@pytest.mark.parametrize("extension", [".png", ".jpg", ".webp", ".tif"])
def test_icc_profile_is_carried_over(pipeline, tmp_path, extension):
    noise_image(24, 20, 6).save(tmp_path / "icc.png", icc_profile=ICC)
    upscale_file(pipeline, tmp_path / "icc.png", tmp_path / f"out{extension}")
    assert Image.open(tmp_path / f"out{extension}").info["icc_profile"] == ICC


def test_16bit_icc_profile_is_carried_over(pipeline, tmp_path):
    Image.fromarray(ramp16(24, 20, 1)[..., 0]).save(tmp_path / "g.png", icc_profile=ICC)
    upscale_file(pipeline, tmp_path / "g.png", tmp_path / "out.png")
    assert Image.open(tmp_path / "out.png").info["icc_profile"] == ICC


def test_cmyk_comes_out_rgb(pipeline, tmp_path):
    noise_image(24, 20, 7).convert("CMYK").save(tmp_path / "c.jpg")
    result = upscale_file(pipeline, tmp_path / "c.jpg", tmp_path / "out.png")
    assert Image.open(tmp_path / "out.png").mode == "RGB"
    assert any("CMYK" in note for note in result.notes)


def test_animated_input_gives_its_first_frame_with_a_warning(pipeline, tmp_path):
    frames = [noise_image(24, 20, seed) for seed in range(3)]
    frames[0].save(tmp_path / "a.png", save_all=True, append_images=frames[1:])
    result = upscale_file(pipeline, tmp_path / "a.png", tmp_path / "out.png")
    assert any("only the first frame" in note for note in result.notes)
    expected = pipeline.upscale(frames[0], OPTIONS)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected))
