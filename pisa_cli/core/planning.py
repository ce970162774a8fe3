"""The plan of one image: sizes at every stage, tile sizes, and estimated working memory.

Pure arithmetic (no model, no pixels), so ``pisa upscale --dry-run`` can print it for a
folder without loading anything, and the pipeline follows the same plan when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pisa_cli.engine import memory
from pisa_cli.engine.denoise import variants_needed
from pisa_cli.engine.tiles import TilePlan, Tiling, plan_tiles
from pisa_cli.engine.vae import Store
from pisa_cli.errors import ImageError
from pisa_cli.imaging.resize import ResizePlan, plan_resize
from pisa_cli.options import UpscaleOptions

TileDefaults = Callable[[UpscaleOptions, int], tuple[int, int]]
"""A family's (tile, overlap) in latent pixels from the options and the largest tile the
free memory allows (``Family.default_tiles``)."""


@dataclass(frozen=True)
class ImagePlan:
    """How one image goes through the model."""

    resize: ResizePlan
    model_size: tuple[int, int]
    """(width, height) of the VAE input: the upsampled image padded to a multiple of 8."""
    latent_size: tuple[int, int]
    """(height, width) of the latent."""
    variants: tuple[str, ...]
    unet: TilePlan
    latent_tile: int
    latent_overlap: int
    tile_batch: int
    tiling: Tiling
    """The family's tile grid (``engine.tiles.Tiling``)."""
    encoder_tile: int | None
    """Encoder tile side in image pixels, None when the image is encoded whole."""
    decoder_tile: int | None
    """Decoder tile side in latent pixels, None when the latent is decoded whole."""
    store: Store
    """Where a tiled VAE keeps whole-image activations: ram, disk, or - (not tiled)."""
    peak_bytes: int
    """Estimated working memory at the busiest stage (weights not included)."""
    free_bytes: int

    def untiled_batch_limit(self, widths: memory.Widths) -> int:
        """Images of this plan one untiled VAE call may hold before its largest activation
        passes 2^31 elements (no limit for a pass in bands: it runs one image at a time)."""
        width, height = self.model_size
        limits = [
            memory.INDEX_LIMIT // max(1, memory.largest_vae_tensor(height, width, widths, dec))
            for dec, tile in ((False, self.encoder_tile), (True, self.decoder_tile))
            if tile is None
        ]
        return max(1, min(limits, default=memory.INDEX_LIMIT))

    def describe(self) -> str:
        """A few lines for --dry-run."""
        (iw, ih), (ow, oh) = self.resize.input_size, self.resize.output_size
        lh, lw = self.latent_size
        unet = self.unet
        tile = f"{unet.tile_size[0]}x{unet.tile_size[1]}"
        passes = "+".join(self.variants)
        lines = [
            f"{iw}x{ih} -> {ow}x{oh}; model input {self.model_size[0]}x{self.model_size[1]}, "
            f"latent {lw}x{lh}",
            f"  unet: {len(unet.tiles)} tile(s) of {tile} latent px, overlap "
            f"{self.latent_overlap}, {self.tile_batch} per call, passes {passes}, "
            f"waste {unet.waste:.2f}x",
            f"  vae encoder: {_vae(self.encoder_tile, 'px')}; decoder: "
            f"{_vae(self.decoder_tile, 'latent px')}; store {self.store}",
            f"  estimated working memory {_gib(self.peak_bytes)} of {_gib(self.free_bytes)} free",
        ]
        return "\n".join(lines)


def _vae(tile: int | None, unit: str) -> str:
    return "whole image" if tile is None else f"bands of a {tile} {unit} tile"


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def plan_image(
    size: tuple[int, int],
    options: UpscaleOptions,
    widths: memory.Widths,
    dtype_bytes: int,
    free_bytes: int,
    variants: tuple[str, ...] | None = None,
    tiling: Tiling = "stablesr",
    host_free_bytes: int | None = None,
    tile_defaults: TileDefaults | None = None,
) -> ImagePlan:
    """The plan for an input of ``size`` (width, height) under ``free_bytes`` of memory.

    ``variants`` are the UNet weight sets the pass needs (default: those of the lambdas);
    ``tiling`` the family's tile grid (REFERENCE sections 5 and 9), ``tile_defaults`` its
    (tile, overlap) when the options leave them to it (None: ``stablesr_tiles``).
    ``host_free_bytes``: the RAM free for the tiled VAE's planes, which live on the host,
    when the model runs on an accelerator (None: on the CPU, where the two are one)."""
    factor = widths.vae_factor
    resize = plan_resize(size, options.scale, options.process_size, factor)
    width, height = resize.model_size
    width, height = width + (-width) % factor, height + (-height) % factor
    latent_h, latent_w = height // factor, width // factor
    variants = variants or variants_needed(options.lambda_pix, options.lambda_sem)
    tiles = options.tiles

    auto = memory.auto_latent_tile(free_bytes, widths, dtype_bytes, len(variants))
    latent_tile, overlap = (tile_defaults or stablesr_tiles)(options, auto)
    unet = plan_tiles(latent_h, latent_w, latent_tile, overlap, tiling)
    per_sample = memory.unet_tile_bytes(*unet.tile_size, widths.unet, dtype_bytes)
    batch = tiles.tile_batch or memory.auto_tile_batch(
        len(unet.tiles), len(variants), per_sample, free_bytes
    )
    batch = min(batch, len(unet.tiles))
    unet_bytes = per_sample * batch * len(variants)

    enc_untiled = memory.encoder_untiled_bytes(height, width, widths, dtype_bytes)
    if tiles.vae_encoder_tile is None:
        encoder = memory.auto_vae_tile(enc_untiled, height * width, widths, dtype_bytes, free_bytes)
    else:
        encoder = None if max(height, width) <= tiles.vae_encoder_tile else tiles.vae_encoder_tile
    dec_untiled = memory.decoder_untiled_bytes(latent_h, latent_w, widths, dtype_bytes)
    if tiles.vae_decoder_tile is None:
        side = memory.auto_vae_tile(dec_untiled, height * width, widths, dtype_bytes, free_bytes)
        decoder = None if side is None else max(memory.MIN_VAE_TILE, side // factor)
    else:
        decoder = (
            None if max(latent_h, latent_w) <= tiles.vae_decoder_tile else tiles.vae_decoder_tile
        )
    # Past 2^31 elements GPU kernels fail: such images go in bands whatever the memory.
    safe = memory.index_safe_tile(widths)
    if encoder is None and not _indexable(height, width, widths, decoder=False):
        encoder = safe
    if decoder is None and not _indexable(height, width, widths, decoder=True):
        decoder = max(memory.MIN_VAE_TILE, safe // factor)

    def vae_bytes(tile_px: int | None, untiled: int) -> int:
        if tile_px is None:
            return untiled
        return memory.banded_bytes(memory.band_budget(tile_px * tile_px, widths), dtype_bytes)

    enc_bytes = vae_bytes(encoder, enc_untiled)
    dec_bytes = vae_bytes(None if decoder is None else decoder * factor, dec_untiled)
    store: Store = "-"
    if encoder is not None or decoder is not None:
        ram = memory.ram_store_bytes(height, width, widths, dtype_bytes)
        if host_free_bytes is not None:  # the planes are in host RAM, the bands on the device
            store = "ram" if ram <= host_free_bytes * memory.SAFETY else "disk"
        else:
            fits = ram + max(enc_bytes, dec_bytes) <= free_bytes * memory.SAFETY
            store = "ram" if fits else "disk"
            if store == "ram":
                enc_bytes += ram if encoder is not None else 0
                dec_bytes += ram if decoder is not None else 0
    return ImagePlan(
        resize=resize,
        model_size=(width, height),
        latent_size=(latent_h, latent_w),
        variants=variants,
        unet=unet,
        latent_tile=latent_tile,
        latent_overlap=overlap,
        tile_batch=batch,
        tiling=tiling,
        encoder_tile=encoder,
        decoder_tile=decoder,
        store=store,
        peak_bytes=max(enc_bytes, unet_bytes, dec_bytes),
        free_bytes=free_bytes,
    )


def _indexable(height: int, width: int, widths: memory.Widths, decoder: bool) -> bool:
    return memory.largest_vae_tensor(height, width, widths, decoder) <= memory.INDEX_LIMIT


def check_pixels(
    source: object, size: tuple[int, int], options: UpscaleOptions, limit: int
) -> None:
    """Refuse an input whose pixels, or whose enlargement for the model, exceed ``limit``
    (``--max-pixels``), with one line naming the file, the limit and how to raise it.

    The small-input path enlarges an input whose short side is below process_size / scale
    to that short side: a 20000x1 strip would become a 2560000x128 model input."""
    width, height = size
    if width * height > limit:
        raise ImageError(
            f"{source}: {width}x{height} is {width * height:,} pixels, more than --max-pixels "
            f"{limit:,}"
        )
    work = plan_resize(size, options.scale, options.process_size).work_size
    if work[0] * work[1] > limit:
        least = options.process_size // options.scale
        raise ImageError(
            f"{source}: {width}x{height} would be enlarged to {work[0]}x{work[1]} "
            f"({work[0] * work[1]:,} pixels, its short side to --process-size / --scale = "
            f"{least}) for the model, more than --max-pixels {limit:,}; crop it, lower "
            "--process-size or raise --max-pixels"
        )


def model_widths(base_model: str) -> memory.Widths:
    """Channel widths of the base model, from its configs when it is on disk (no weights
    read), else SD 2.1-base's: what a plan needs before any model is loaded."""
    from pisa_cli.models.base import find_local_base_model, read_part_config

    folder = find_local_base_model(base_model)
    if folder is None:
        return memory.Widths()
    unet, vae = read_part_config(folder, "unet"), read_part_config(folder, "vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return memory.Widths(unet["block_out_channels"][0], vae["block_out_channels"][0], factor)


PISA_OVERLAP = 32
"""PiSA-SR's script's latent tile overlap."""


def stablesr_tiles(options: UpscaleOptions, auto: int) -> tuple[int, int]:
    """(tile, overlap) in latent pixels on StableSR's grid: the options', else 96 or what
    the memory allows (``auto``) and 32, at most a third of an automatic tile (PiSA-SR's
    script, REFERENCE section 5)."""
    tiles = options.tiles
    tile = tiles.latent_tile or auto
    overlap = PISA_OVERLAP if tiles.latent_overlap is None else tiles.latent_overlap
    if tiles.latent_tile is None:
        overlap = min(overlap, tile // 3)
    return tile, overlap
