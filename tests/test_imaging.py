"""Files and pixels without the model: discovery, reading every mode, writing every format,
the 16-bit codecs."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import png
import pytest
import tifffile
from PIL import Image, ImageOps

from pisa_cli.errors import ImageError, OptionsError
from pisa_cli.fsutil import TEMP_PREFIX, atomic_path, remove_stale_temp_files
from pisa_cli.imaging.deep import DeepImage
from pisa_cli.imaging.discover import discover
from pisa_cli.imaging.io import read_picture, read_size, write_output
from pisa_cli.imaging.modes import Pixels, compose
from pisa_cli.options import BatchOptions, WriteOptions
from tests.builders import ICC, noise_image, ramp16, save_png16

# --- discovery ---------------------------------------------------------------------------


def names(jobs, root):
    return sorted(str(job.output.relative_to(root)) for job in jobs)


def test_name_collisions_never_overwrite(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    for folder in (first, second):
        noise_image(8, 8).save(folder / "a.png")
    noise_image(8, 8).save(first / "a.jpg")
    noise_image(8, 8).save(first / "b.png")
    out = tmp_path / "out"
    found = discover([first, second], out)
    outputs = [job.output for job in found.jobs]
    assert len(set(outputs)) == len(outputs) == 4
    assert names(found.jobs, out) == ["a_jpg.png", "a_png-2.png", "a_png.png", "b.png"]
    # with --format same the names differ by extension already: nothing is renamed
    same = discover([first], out, batch=BatchOptions(write=WriteOptions(format="same")))
    assert names(same.jobs, out) == ["a.jpg", "a.png", "b.png"]


def test_folders_are_listed_in_natural_order(tmp_path):
    for name in ("img10.png", "img2.png", "IMG1.png"):
        noise_image(8, 8).save(tmp_path / name)
    found = discover([tmp_path], tmp_path / "out")
    assert [job.source.name for job in found.jobs] == ["IMG1.png", "img2.png", "img10.png"]


def test_suffix_and_format(tmp_path):
    noise_image(8, 8).save(tmp_path / "photo.jpg")
    found = discover(
        [tmp_path / "photo.jpg"],
        tmp_path / "o",
        batch=BatchOptions(write=WriteOptions(format="webp")),
    )
    assert found.jobs[0].output.name == "photo.webp"
    found = discover(
        [tmp_path],
        tmp_path / "o",
        batch=BatchOptions(write=WriteOptions(suffix="_x4", format="tiff")),
    )
    assert found.jobs[0].output.name == "photo_x4.tif"


def test_recursive_mirrors_the_tree_and_skips_the_output_folder(tmp_path):
    root = tmp_path / "in"
    (root / "trips" / "2024").mkdir(parents=True)
    noise_image(8, 8).save(root / "top.png")
    noise_image(8, 8).save(root / "trips" / "2024" / "beach.jpg")
    (root / "trips" / "readme.txt").write_text("hi")
    out = root / "upscaled"  # inside the input tree: never read back as input
    out.mkdir()
    noise_image(8, 8).save(out / "top.png")
    flat = discover([root], out)
    assert names(flat.jobs, out) == ["top.png"]
    assert [p.name for p in flat.unsearched] == ["trips"]  # upscaled/ is the output
    deep = discover([root], out, batch=BatchOptions(recursive=True))
    assert names(deep.jobs, out) == ["top.png", "trips/2024/beach.png"]
    assert [p.name for p in deep.skipped] == ["readme.txt"]


def test_glob_patterns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shots" / "day1").mkdir(parents=True)
    noise_image(8, 8).save(tmp_path / "shots" / "day1" / "a.jpg")
    noise_image(8, 8).save(tmp_path / "shots" / "b.jpg")
    noise_image(8, 8).save(tmp_path / "shots" / "c.png")
    found = discover(["shots/**/*.jpg", "nothing/*.png"], tmp_path / "out")
    assert names(found.jobs, tmp_path / "out") == ["a.png", "b.png"]
    assert found.missing == ["nothing/*.png"]
    mirrored = discover(["shots/**/*.jpg"], tmp_path / "out", batch=BatchOptions(recursive=True))
    assert names(mirrored.jobs, tmp_path / "out") == ["b.png", "day1/a.png"]


def test_an_output_replacing_its_input_is_refused(tmp_path):
    noise_image(8, 8).save(tmp_path / "a.png")
    found = discover([tmp_path], tmp_path)
    assert not found.jobs and [job.source.name for job in found.conflicts] == ["a.png"]
    renamed = discover([tmp_path], tmp_path, batch=BatchOptions(write=WriteOptions(suffix="_x4")))
    assert [job.output.name for job in renamed.jobs] == ["a_x4.png"]


def test_excluded_paths_are_not_inputs(tmp_path):
    noise_image(8, 8).save(tmp_path / "a.png")
    noise_image(8, 8).save(tmp_path / "a_x4.png")
    excluded = {(tmp_path / "a_x4.png").resolve()}
    found = discover([tmp_path], tmp_path, exclude=excluded)
    assert [job.source.name for job in found.jobs + found.conflicts] == ["a.png"]
    named = discover([tmp_path / "a_x4.png"], tmp_path / "again", exclude=excluded)
    assert [job.source.name for job in named.jobs] == ["a_x4.png"]  # asked for by name


# --- reading every mode ------------------------------------------------------------------


def test_rgba_splits_colour_and_alpha(tmp_path):
    image = noise_image(12, 10, 1).convert("RGBA")
    alpha = Image.fromarray(np.arange(120, dtype=np.uint8).reshape(10, 12) * 2)
    image.putalpha(alpha)
    image.save(tmp_path / "a.png")
    picture = read_picture(tmp_path / "a.png")
    assert picture.color.mode == "RGB" and not picture.grey
    assert np.array_equal(np.asarray(picture.alpha), np.asarray(alpha))


@pytest.mark.parametrize(
    ("mode", "grey", "has_alpha"),
    [("L", True, False), ("LA", True, True), ("1", True, False), ("P", False, False)],
)
def test_modes_are_classified(tmp_path, mode, grey, has_alpha):
    noise_image(12, 10, 2).convert(mode).save(tmp_path / "x.png")
    picture = read_picture(tmp_path / "x.png")
    assert picture.grey == grey and (picture.alpha is not None) == has_alpha
    assert picture.color.mode == "RGB"


def test_palette_with_transparency_gets_alpha(tmp_path):
    image = noise_image(12, 10, 3).convert("P")
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=int(np.asarray(image)[0, 0]))
    picture = read_picture(tmp_path / "p.png")
    assert picture.alpha is not None and np.asarray(picture.alpha)[0, 0] == 0


def test_cmyk_becomes_rgb(tmp_path):
    noise_image(12, 10, 4).convert("CMYK").save(tmp_path / "c.jpg")
    picture = read_picture(tmp_path / "c.jpg")
    assert picture.color.mode == "RGB" and picture.mode == "CMYK"
    assert any("CMYK" in note for note in picture.notes)


def test_animation_takes_the_first_frame_with_a_note(tmp_path):
    frames = [noise_image(12, 10, seed).convert("P") for seed in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    picture = read_picture(tmp_path / "anim.gif")
    assert any("3 frames" in note for note in picture.notes)
    first = np.asarray(frames[0].convert("RGB"))
    assert np.array_equal(np.asarray(picture.color), first)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(tmp_path, orientation):
    image = noise_image(16, 10, 5)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x013B] = "Someone"  # Artist: kept in the output's EXIF
    image.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=100)
    expected = ImageOps.exif_transpose(Image.open(tmp_path / "o.jpg")).convert("RGB")
    picture = read_picture(tmp_path / "o.jpg")
    assert np.array_equal(np.asarray(picture.color), np.asarray(expected))
    assert read_size(tmp_path / "o.jpg") == expected.size
    kept = Image.Exif()
    kept.load(picture.exif)
    assert kept[0x0112] == 1 and kept[0x013B] == "Someone"


def test_16bit_grey_is_read_without_truncation(tmp_path):
    values = ramp16(40, 30, 1)[..., 0]
    Image.fromarray(values).save(tmp_path / "g.png")
    picture = read_picture(tmp_path / "g.png")
    assert picture.deep and picture.grey and picture.mode == "I;16"
    got = np.rint(picture.color.to_array()[..., 0] * 65535)
    assert np.array_equal(got, values)


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16bit_colour_png_is_read_without_truncation(tmp_path, channels):
    values = ramp16(40, 30, channels, seed=channels)
    save_png16(values, tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").mode != "I;16"  # Pillow alone would cut it
    picture = read_picture(tmp_path / "c.png")
    assert picture.deep and picture.grey == (channels == 2)
    colour = np.rint(picture.color.to_array() * 65535)
    assert np.array_equal(colour[..., 0], values[..., 0])
    if channels in (2, 4):
        assert np.array_equal(np.rint(np.asarray(picture.alpha) * 65535), values[..., -1])


def test_16bit_planar_tiff_is_read(tmp_path):
    values = ramp16(40, 30, 3)
    planes = np.moveaxis(values, -1, 0)
    tifffile.imwrite(tmp_path / "p.tif", planes, photometric="rgb", planarconfig="separate")
    picture = read_picture(tmp_path / "p.tif")
    assert np.array_equal(np.rint(picture.color.to_array() * 65535), values)


def test_16bit_rgb_tiff_is_read_without_truncation_and_upright(tmp_path):
    values = ramp16(40, 30, 3)
    tifffile.imwrite(tmp_path / "t.tif", values, photometric="rgb", extratags=[(274, 3, 1, 6)])
    picture = read_picture(tmp_path / "t.tif")
    assert picture.deep and picture.size == (30, 40)  # orientation 6: turned upright
    upright = np.rot90(values, -1)
    assert np.array_equal(np.rint(picture.color.to_array() * 65535), upright)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file (0 bytes)"),
        (b"just some text\n", "not an image Pillow can read"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "corrupt or truncated"),
    ],
)
def test_unreadable_files_name_the_file_and_the_reason(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=re.escape(message)) as caught:
        read_picture(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_truncated_file(tmp_path):
    buffer = io.BytesIO()
    noise_image(64, 64, 6).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: corrupt or truncated"):
        read_picture(tmp_path / "cut.png")


def test_max_pixels_refuses_before_decoding(tmp_path, monkeypatch):
    noise_image(40, 30, 7).save(tmp_path / "big.png")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(ImageError, match="40x30 is 1,200 pixels, more than --max-pixels 1,000"):
        read_picture(tmp_path / "big.png", max_pixels=1000)


# --- writing -----------------------------------------------------------------------------


def test_16bit_png_writer_round_trips_with_icc_and_exif(tmp_path):
    for channels in (1, 2, 3, 4):
        values = ramp16(300, 270, channels, seed=channels)  # more rows than one chunk
        exif = Image.Exif()
        exif[0x013B] = "Someone"
        path = tmp_path / f"w{channels}.png"
        write_output(Pixels(deep=values, icc_profile=ICC, exif=exif.tobytes()), path)
        _, _, rows, info = png.Reader(filename=str(path)).read_flat()
        assert info["bitdepth"] == 16 and info["planes"] == channels
        assert np.array_equal(np.asarray(rows).reshape(values.shape), values)
        with Image.open(path) as image:
            assert image.info["icc_profile"] == ICC
            assert image.getexif()[0x013B] == "Someone"


def test_16bit_tiff_writer_round_trips(tmp_path):
    values = ramp16(50, 40, 4)
    write_output(Pixels(deep=values, icc_profile=ICC), tmp_path / "w.tif")
    assert np.array_equal(tifffile.imread(tmp_path / "w.tif"), values)
    with tifffile.TiffFile(tmp_path / "w.tif") as tiff:
        assert tiff.pages[0].iccprofile == ICC


@pytest.mark.parametrize("extension", [".png", ".jpg", ".webp", ".tif"])
def test_icc_and_exif_are_kept_by_every_format(tmp_path, extension):
    exif = Image.Exif()
    exif[0x013B] = "Someone"
    pixels = Pixels(image=noise_image(20, 16, 8), icc_profile=ICC, exif=exif.tobytes())
    write_output(pixels, tmp_path / f"x{extension}")
    with Image.open(tmp_path / f"x{extension}") as image:
        assert image.info.get("icc_profile") == ICC
        assert image.getexif().get(0x013B) == "Someone"


def test_jpeg_flattens_alpha_onto_white_and_16_bits_to_8(tmp_path):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    notes = write_output(Pixels(image=image), tmp_path / "f.jpg", WriteOptions(quality=100))
    assert any("flattened" in note for note in notes)
    assert np.asarray(Image.open(tmp_path / "f.jpg")).min() >= 250
    notes = write_output(Pixels(deep=ramp16(8, 8, 3)), tmp_path / "d.jpg")
    assert any("8 bits" in note for note in notes)


def test_webp_refuses_sides_it_cannot_hold(tmp_path):
    pixels = Pixels(image=Image.new("RGB", (16384, 1)))
    with pytest.raises(ImageError, match=r"too large for WEBP.*--format png"):
        write_output(pixels, tmp_path / "wide.webp")
    assert not list(tmp_path.iterdir())


def test_a_failed_encode_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(ImageError, match="cannot write"):
        write_output(Pixels(image=noise_image(8, 8)), tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_outputs_get_normal_permissions(tmp_path):
    write_output(Pixels(image=noise_image(8, 8)), tmp_path / "x.png")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o666 & ~mask


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / f"{TEMP_PREFIX}999999999-abc.png"  # no such process
    dead.write_bytes(b"partial")
    with atomic_path(tmp_path / "live.png") as temp:  # ours, still being written
        temp.write_bytes(b"x")
        removed = remove_stale_temp_files(tmp_path)
        assert removed == [dead] and temp.exists()
    assert not dead.exists()


def test_compose_reattaches_alpha_and_grey():
    alpha = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1)))
    from pisa_cli.imaging.modes import Picture

    picture = Picture(color=noise_image(16, 16).convert("RGB"), alpha=alpha, grey=True)
    upscaled = noise_image(64, 64, 9)
    pixels = compose(picture, upscaled)
    assert pixels.image.mode == "LA" and pixels.image.size == (64, 64)
    expected = alpha.resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(pixels.image.getchannel("A")), np.asarray(expected))
    deep = compose(picture, DeepImage.from_array(np.asarray(upscaled) / 255.0))
    assert deep.deep.shape == (64, 64, 2)


def test_an_unlistable_folder_is_one_line_not_a_crash(tmp_path, monkeypatch):
    from pathlib import Path

    locked = tmp_path / "locked"
    locked.mkdir()
    noise_image(8, 8).save(tmp_path / "fine.png")
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    found = discover([locked, tmp_path / "fine.png"], tmp_path / "out")
    assert found.unreadable == [f"{locked}: cannot list (Permission denied)"]
    assert [job.source.name for job in found.jobs] == ["fine.png"]


def test_every_output_format_has_an_extension_and_a_pillow_writer():
    """--format's choices are the formats table's rows (plus same), each one Pillow writes."""
    from pisa_cli.imaging.formats import EXTENSIONS, pillow_format, writable
    from pisa_cli.options import OUTPUT_FORMATS

    assert (*EXTENSIONS, "same") == OUTPUT_FORMATS
    for extension in EXTENSIONS.values():
        assert writable(extension) and pillow_format(Path(f"x{extension}"))
    with pytest.raises(OptionsError, match="--format 'gif' is not one of png, jpg, webp, tiff"):
        WriteOptions(format="gif")
