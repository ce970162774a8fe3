"""`pisa sweep`: a lambda grid per image, a contact sheet, metrics, and a slider viewer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from pisa_cli.cli import common
from pisa_cli.cli.progress import summary, track
from pisa_cli.errors import OptionsError, PisaError, WeightsError
from pisa_cli.sweep.grid import DEFAULT_MAX_POINTS, DEFAULT_SPEC

SWEEP = "Sweep"

LambdaGrid = Annotated[
    str,
    typer.Option(
        "--lambda-grid",
        help="The (lambda_pix, lambda_sem) points: both axes, separated by a space; each a "
        "comma list or an inclusive start:stop:step range, values in steps of 0.01. "
        'Example: --lambda-grid "pix=0,0.5,1 sem=0:1.5:0.25" (3 x 7 points).',
        rich_help_panel=SWEEP,
    ),
]
MaxPoints = Annotated[
    int,
    typer.Option(
        "--max-points", help="Refuse grids with more points than this.", rich_help_panel=SWEEP
    ),
]
NoImages = Annotated[
    bool,
    typer.Option(
        "--no-images",
        help="Do not write each point's image (the contact sheet, metrics and viewer still "
        "are; the viewer then embeds the exact images).",
        rich_help_panel=SWEEP,
    ),
]
Viewer = Annotated[
    bool,
    typer.Option(
        "--viewer",
        help="Write viewer.html: two lambda sliders that blend live, the exact image on grid "
        "points, and a before/after split against the bicubic input. Opens from disk.",
        rich_help_panel=SWEEP,
    ),
]
GroundTruth = Annotated[
    Path | None,
    typer.Option(
        "--gt",
        help="Folder of ground-truth images (the output's size), matched by file stem: adds "
        "PSNR and SSIM on the Y channel per point (metrics.csv, heat maps, best points).",
        show_default=False,
        rich_help_panel=SWEEP,
    ),
]
Metrics = Annotated[
    str,
    typer.Option(
        "--metrics",
        help="Comma list of psnr, ssim, lpips, dists (with --gt), clipiqa, musiq, niqe, or "
        "all. Default: psnr,ssim with --gt, none without. All but psnr and ssim need the "
        "metrics extra: pipx install 'pisa-cli[metrics]'.",
        show_default=False,
        rich_help_panel=SWEEP,
    ),
]
CropBorder = Annotated[
    int,
    typer.Option(
        "--crop-border",
        help="Pixels left out at each edge for PSNR and SSIM (some papers use the scale).",
        rich_help_panel=SWEEP,
    ),
]
SheetCell = Annotated[
    int,
    typer.Option(
        "--sheet-cell",
        help="Longest side of a contact sheet cell in pixels.",
        rich_help_panel=SWEEP,
    ),
]
SheetCrop = Annotated[
    bool,
    typer.Option(
        "--sheet-crop",
        help="Contact sheet cells show a 1:1 crop of the centre instead of the whole image.",
        rich_help_panel=SWEEP,
    ),
]


SWEEP_OPTIONS = (
    "lambda_grid",
    "max_points",
    "no_images",
    "viewer",
    "gt",
    "metrics",
    "crop_border",
    "sheet_cell",
    "sheet_crop",
)
"""The parameters of sweep_command that are the sweep's own (the rest are upscale's)."""


def sweep_command(
    inputs: common.Inputs,
    output: common.OutputDir,
    lambda_grid: LambdaGrid = DEFAULT_SPEC,
    max_points: MaxPoints = DEFAULT_MAX_POINTS,
    no_images: NoImages = False,
    viewer: Viewer = False,
    gt: GroundTruth = None,
    metrics: Metrics = "",
    crop_border: CropBorder = 0,
    sheet_cell: SheetCell = 256,
    sheet_crop: SheetCrop = False,
    base_model: common.BaseModel = "",
    weights: common.Weights = "",
    scale: common.Scale = 4,
    process_size: common.ProcessSize = 512,
    color_fix: common.ColorFix = "adain",
    prompt: common.Prompt = "",
    seed: common.Seed = None,
    vae_sample: common.VaeSample = False,
    latent_tile: common.LatentTile = "auto",
    latent_overlap: common.LatentOverlap = "auto",
    vae_encoder_tile: common.VaeEncoderTile = "auto",
    vae_decoder_tile: common.VaeDecoderTile = "auto",
    tile_batch: common.TileBatch = "auto",
    second_pass: common.SecondPass = "none",
    second_pass_weights: common.SecondPassWeights = "",
    second_pass_timestep: common.SecondPassTimestep = None,
    second_pass_prompt: common.SecondPassPrompt = "",
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
    compile: common.Compile = False,
    dry_run: common.DryRun = False,
    quiet: common.Quiet = False,
    verbose: common.Verbose = False,
) -> None:
    """Upscale each image at every point of a lambda grid: `pisa sweep photo.png -o sweeps/`.

    Per image the encoder runs once and the UNet twice (pixel and PiSA eps) whatever the
    grid's size; each point is then decoded exactly. Writes OUTPUT/<name>/ with
    pix0.50_sem1.30.png per point, contact_sheet.png, sweep.json, and metrics.csv with
    --gt, viewer.html with --viewer. Exit code 0 when every image worked, 1 when some
    failed, 2 for bad options, 3 when the model or weights cannot be loaded.
    """
    common.setup_logging(quiet, verbose)
    values = dict(locals())
    for name in ("inputs", "output", "quiet", "verbose", "dry_run"):
        values.pop(name)
    sweep_values = {name: values.pop(name) for name in SWEEP_OPTIONS}
    try:
        model_options, options = common.build_options(values)
        settings, metric_names = _settings(sweep_values, model_options, options)
    except PisaError as error:
        raise common.fail(error) from None

    from pisa_cli.imaging.discover import discover

    found = discover(inputs, output, extension="")
    for missing in found.missing:
        typer.echo(f"error: {missing}: no such file or folder", err=True)
    if not found.jobs:
        typer.echo("error: no images to sweep in the given inputs", err=True)
        raise typer.Exit(1)
    if dry_run:
        _print_plans(found.jobs, settings, model_options)
        return
    counts = _run(found.jobs, output, settings, metric_names, crop_border, quiet)
    counts["failed"] += len(found.missing)
    extra = f"; {len(found.skipped)} non-image files ignored" if found.skipped else ""
    typer.echo(summary(counts, extra), err=True)
    if counts["failed"]:
        raise typer.Exit(1)


def _settings(values: dict, model_options, options):
    """SweepSettings and metric names from the sweep's own options (OptionsError if bad;
    WeightsError for weights without lambdas)."""
    from pisa_cli.models.adapters import OMGSR, family_of
    from pisa_cli.sweep.grid import parse_grid

    weights = model_options.resolved_weights()
    if family_of(weights) == OMGSR:
        raise WeightsError(
            f"{weights}: an OMGSR-style adapter folder has no lambdas to sweep (they are "
            "PiSA-SR's); use pisa upscale, or sweep with PiSA-SR weights"
        )
    from pisa_cli.sweep.metrics import BUILT_IN, parse_metrics
    from pisa_cli.sweep.run import SweepSettings
    from pisa_cli.sweep.sheet import SheetOptions

    grid = parse_grid(values["lambda_grid"], values["max_points"])
    gt = values["gt"]
    if gt is not None and not gt.is_dir():
        raise OptionsError(f"--gt {gt}: no such folder")
    if values["crop_border"] < 0:
        raise OptionsError(f"--crop-border {values['crop_border']} must be 0 or more")
    requested = values["metrics"] or (",".join(BUILT_IN) if gt is not None else "")
    names = parse_metrics(requested, has_gt=gt is not None)
    settings = SweepSettings(
        grid=grid,
        options=options,
        images=not values["no_images"],
        viewer=values["viewer"],
        gt_dir=gt,
        sheet=SheetOptions(cell=values["sheet_cell"], crop=values["sheet_crop"]),
        model=model_options,
    )
    return settings, names


def _run(jobs, output: Path, settings, metric_names, crop_border: int, quiet: bool) -> Counter:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        typer.echo(f"error: {output}: cannot create the output folder ({error.strerror})", err=True)
        raise typer.Exit(1) from None

    from pisa_cli.loading import load_pipeline
    from pisa_cli.sweep.grid import plan_options
    from pisa_cli.sweep.metrics import MetricSet
    from pisa_cli.sweep.run import sweep_jobs

    try:
        pipeline = load_pipeline(settings.model, options=plan_options(settings.options))
        pipeline.stages(plan_options(settings.options))  # e.g. no second-pass timestep
        metric_set = None
        if metric_names:
            metric_set = MetricSet(metric_names, str(pipeline.device), crop_border)
            metric_set.load()
    except PisaError as error:
        raise common.fail(error) from None
    counts: Counter = Counter()
    names = [str(job.source) for job in jobs]
    results = sweep_jobs(pipeline, jobs, settings, metric_set)
    for result in track(results, len(jobs), names, quiet):
        counts[result.status] += 1
        for metric, (point, value) in result.best.items():
            typer.echo(
                f"{result.job.output}: best {metric} {value:.4g} at lambda_pix {point.pix:.2f}, "
                f"lambda_sem {point.sem:.2f}"
            )
    return counts


def _print_plans(jobs: list, settings, model_options) -> None:
    """--dry-run: the grid, then each image's plan; no model loaded."""
    from pisa_cli.runner import dry_run
    from pisa_cli.sweep.grid import plan_options

    grid = settings.grid
    typer.echo(
        f"grid {grid.spec}: {grid.size} points; per image 1 encode, UNet pix + pisa once, "
        f"{grid.size} decodes"
    )
    try:
        for job, plans in dry_run(jobs, plan_options(settings.options), model_options):
            if isinstance(plans, str):
                typer.echo(f"error: {plans}", err=True)
            else:
                typer.echo(f"{job.source} -> {job.output}/")
                for index, plan in enumerate(plans):
                    typer.echo(("second pass, per point: " if index else "") + plan.describe())
    except PisaError as error:
        raise common.fail(error) from None
