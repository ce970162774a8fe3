"""Automatic tile sizes from free memory, and the plan --dry-run prints."""

from __future__ import annotations

from pisa_cli.core.planning import plan_image
from pisa_cli.engine.memory import Widths
from pisa_cli.options import TileOptions, UpscaleOptions

GIB = 2**30
SD = Widths()


def test_plenty_of_memory_means_no_vae_tiling_and_the_reference_unet_tile():
    plan = plan_image((512, 512), UpscaleOptions(), SD, 4, 64 * GIB)
    assert plan.encoder_tile is None and plan.decoder_tile is None and plan.store == "-"
    assert plan.latent_tile == 96 and plan.latent_overlap == 32
    assert plan.latent_size == (256, 256) and len(plan.unet.tiles) == 16
    assert plan.peak_bytes < 64 * GIB * 0.6


def test_little_memory_tiles_the_vae_and_spills_to_disk():
    plan = plan_image((2000, 1500), UpscaleOptions(), SD, 2, 2 * GIB)
    assert plan.encoder_tile is not None and plan.decoder_tile is not None
    assert plan.store == "disk"
    assert plan.peak_bytes <= 2 * GIB * 0.6


def test_very_little_memory_shrinks_the_unet_tile():
    roomy = plan_image((512, 512), UpscaleOptions(), SD, 4, 64 * GIB)
    tight = plan_image((512, 512), UpscaleOptions(), SD, 4, GIB // 2)
    assert tight.latent_tile < roomy.latent_tile
    assert tight.latent_overlap < tight.latent_tile
    assert tight.tile_batch == 1


def test_more_memory_never_means_smaller_tiles():
    previous = None
    for free in (GIB // 4, GIB, 4 * GIB, 16 * GIB, 64 * GIB):
        plan = plan_image((1200, 900), UpscaleOptions(), SD, 4, free)
        decoder = plan.decoder_tile or 10**9
        if previous is not None:
            assert plan.latent_tile >= previous[0] and decoder >= previous[1]
        previous = (plan.latent_tile, decoder)


def test_explicit_tiles_are_used_as_given():
    tiles = TileOptions(
        latent_tile=48, latent_overlap=16, vae_encoder_tile=256, vae_decoder_tile=32, tile_batch=2
    )
    plan = plan_image((200, 100), UpscaleOptions(tiles=tiles), SD, 4, 64 * GIB)
    assert (plan.latent_tile, plan.latent_overlap, plan.tile_batch) == (48, 16, 2)
    assert plan.encoder_tile == 256 and plan.decoder_tile == 32
    small = plan_image((20, 10), UpscaleOptions(tiles=tiles, process_size=32), SD, 4, 64 * GIB)
    assert small.encoder_tile is None and small.decoder_tile is None  # fits in one tile


def test_describe_names_every_stage():
    text = plan_image((640, 480), UpscaleOptions(lambda_sem=0.5), SD, 4, GIB).describe()
    for word in (
        "640x480 -> 2560x1920",
        "latent 320x240",
        "unet:",
        "passes pix+pisa",
        "vae encoder",
        "decoder",
        "estimated working memory",
    ):
        assert word in text, word
