"""`pisa upscale`: load the model once, stream every input through it, report, exit code."""

from __future__ import annotations

from collections import Counter

import typer

from pisa_cli.cli import common
from pisa_cli.cli.progress import summary, track
from pisa_cli.errors import PisaError


def upscale_command(
    inputs: common.Inputs,
    output: common.OutputDir,
    base_model: common.BaseModel = "",
    weights: common.Weights = "",
    scale: common.Scale = 4,
    process_size: common.ProcessSize = 512,
    lambda_pix: common.LambdaPix = 1.0,
    lambda_sem: common.LambdaSem = 1.0,
    color_fix: common.ColorFix = "adain",
    prompt: common.Prompt = "",
    seed: common.Seed = None,
    vae_sample: common.VaeSample = False,
    latent_tile: common.LatentTile = "auto",
    latent_overlap: common.LatentOverlap = 32,
    vae_encoder_tile: common.VaeEncoderTile = "auto",
    vae_decoder_tile: common.VaeDecoderTile = "auto",
    tile_batch: common.TileBatch = "auto",
    second_pass: common.SecondPass = "none",
    second_pass_weights: common.SecondPassWeights = "",
    second_pass_timestep: common.SecondPassTimestep = None,
    second_pass_prompt: common.SecondPassPrompt = "",
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
    dry_run: common.DryRun = False,
    quiet: common.Quiet = False,
    verbose: common.Verbose = False,
) -> None:
    """Upscale images with PiSA-SR: `pisa upscale photos/ -o upscaled/`.

    The output of photo.jpg is OUTPUT/photo.png, exactly --scale times the input size
    (2 x --scale with --second-pass).
    Exit code 0 when every image worked, 1 when some failed, 2 for bad options,
    3 when the model or weights cannot be loaded.
    """
    common.setup_logging(quiet, verbose)
    values = dict(locals())
    for name in ("inputs", "output", "quiet", "verbose", "dry_run"):
        values.pop(name)
    try:
        model_options, options = common.build_options(values)
    except PisaError as error:
        raise common.fail(error) from None

    from pisa_cli.imaging.discover import discover

    found = discover(inputs, output)
    for missing in found.missing:
        typer.echo(f"error: {missing}: no such file or folder", err=True)
    if not found.jobs:
        typer.echo("error: no images to upscale in the given inputs", err=True)
        raise typer.Exit(1)
    if dry_run:
        _print_plans(found.jobs, options, model_options)
        return
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        typer.echo(f"error: {output}: cannot create the output folder ({error.strerror})", err=True)
        raise typer.Exit(1) from None

    from pisa_cli.pipeline import load_pipeline
    from pisa_cli.runner import run_jobs

    try:
        pipeline = load_pipeline(model_options, options=options)
    except PisaError as error:
        raise common.fail(error) from None
    counts: Counter = Counter()
    names = [str(job.source) for job in found.jobs]
    results = run_jobs(pipeline, found.jobs, options)
    for result in track(results, len(found.jobs), names, quiet):
        counts[result.status] += 1
    counts["failed"] += len(found.missing)
    extra = f"; {len(found.skipped)} non-image files ignored" if found.skipped else ""
    typer.echo(summary(counts, extra), err=True)
    if counts["failed"]:
        raise typer.Exit(1)


def _print_plans(jobs: list, options, model_options) -> None:
    """--dry-run: each image's plan, from its header and the free memory; no model loaded."""
    from pisa_cli.runner import dry_run

    try:
        for job, plans in dry_run(jobs, options, model_options):
            if isinstance(plans, str):
                typer.echo(f"error: {plans}", err=True)
                continue
            typer.echo(f"{job.source} -> {job.output}")
            for index, plan in enumerate(plans):
                typer.echo(("second pass: " if index else "") + plan.describe())
    except PisaError as error:
        raise common.fail(error) from None
