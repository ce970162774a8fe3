"""`pisa sweep`: a lambda grid per image, a contact sheet, metrics, and a slider viewer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from pisa_cli.cli import common, spec, steps
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


OWN = [
    spec.option("lambda_grid", LambdaGrid, DEFAULT_SPEC),
    spec.option("max_points", MaxPoints, DEFAULT_MAX_POINTS),
    spec.option("no_images", NoImages, False),
    spec.option("viewer", Viewer, False),
    spec.option("gt", GroundTruth, None),
    spec.option("metrics", Metrics, ""),
    spec.option("crop_border", CropBorder, 0),
    spec.option("sheet_cell", SheetCell, 256),
    spec.option("sheet_crop", SheetCrop, False),
]
"""The sweep's own options; the others are upscale's (``cli.spec``), declared once."""


@spec.takes(
    spec.CONTEXT, spec.INPUTS, OWN, spec.MAX_PIXELS, spec.MODEL, spec.SCALE, spec.LOOK,
    spec.TILES, spec.SECOND, spec.DEVICE, spec.RUN,
)  # fmt: skip
def sweep_command(context: typer.Context, **values) -> None:
    """Upscale each image at every point of a lambda grid: `pisa sweep photo.png -o sweeps/`.

    Per image the encoder runs once and the UNet twice (pixel and PiSA eps) whatever the
    grid's size; each point is then decoded exactly. Writes OUTPUT/<name>/ with
    pix0.50_sem1.30.png per point, contact_sheet.png, sweep.json, and metrics.csv with
    --gt, viewer.html with --viewer. Exit code 0 when every image worked, 1 when some
    failed, 2 for bad options, 3 when the model or weights cannot be loaded.
    """
    common.setup_logging(values["quiet"], values["verbose"])
    try:
        run = spec.SweepSpec.parse(values, tuple(parameter.name for parameter in OWN))
        settings, metric_names = _settings(run)
    except PisaError as error:
        raise common.fail(error) from None
    grid = settings.grid
    lambdas = [("lambda_pix", min(grid.pix)), ("lambda_sem", min(grid.sem))]
    steps.warn_unusual(run.options, run.model.resolved_weights(), lambdas)

    from pisa_cli.batch.plan import refuse_long_names
    from pisa_cli.imaging.discover import discover

    found = discover(list(run.inputs), run.output, extension="")
    refuse_long_names(found, run.output)
    failed_early = steps.say_discovery(found)
    if not found.jobs:
        common.say("error: no images to sweep in the given inputs", err=True)
        raise typer.Exit(1)
    if run.dry_run:  # exits as the sweep would: 1 when any input would fail
        if _print_plans(found.jobs, settings, run.model) or failed_early:
            raise typer.Exit(1)
        return
    load = steps.pipeline_factory(context)
    counts = _run(found.jobs, run, settings, metric_names, load)
    counts["failed"] += failed_early
    extra = f"; {len(found.skipped)} non-image files ignored" if found.skipped else ""
    common.say(summary(counts, extra), err=True)
    if counts["failed"]:
        raise typer.Exit(1)


def _settings(run: spec.SweepSpec):
    """SweepSettings and metric names from the sweep's own options (OptionsError if bad)."""
    from pisa_cli.core.families import family_of
    from pisa_cli.sweep.grid import parse_grid
    from pisa_cli.sweep.metrics import BUILT_IN, parse_metrics
    from pisa_cli.sweep.settings import SweepSettings
    from pisa_cli.sweep.sheet import SheetOptions

    weights = run.model.resolved_weights()
    refusal = family_of(weights).refuses_sweep()
    if refusal:
        raise WeightsError(f"{weights}: {refusal}; use pisa upscale, or sweep with PiSA-SR weights")
    values = run.sweep
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
        options=run.options,
        images=not values["no_images"],
        viewer=values["viewer"],
        gt_dir=gt,
        sheet=SheetOptions(cell=values["sheet_cell"], crop=values["sheet_crop"]),
        max_pixels=run.max_pixels,
        image_batch=run.image_batch,
        model=run.model,
    )
    return settings, names


def _run(jobs, run: spec.SweepSpec, settings, metric_names, load) -> Counter:
    from pisa_cli.batch.plan import make_output_folder, remove_empty_folder, screen
    from pisa_cli.options import BatchOptions
    from pisa_cli.sweep.grid import plan_options

    try:
        made = make_output_folder(run.output, BatchOptions())
    except PisaError as error:
        raise common.fail(error) from None
    try:
        runnable, refused = screen(jobs, plan_options(settings.options), settings.max_pixels)
        if runnable:
            crop = run.sweep["crop_border"]
            return _sweep(jobs, settings, metric_names, crop, run.quiet, load)
        from pisa_cli.sweep.run import SweepResult

        failed = [SweepResult(job=job, status="failed", error=error) for job, error in refused]
        names = [str(job.source) for job in jobs]
        return Counter(result.status for result in track(failed, len(jobs), names, run.quiet))
    finally:
        if made is not None:
            remove_empty_folder(made)


def _sweep(jobs, settings, metric_names, crop_border: int, quiet: bool, load) -> Counter:
    from pisa_cli.sweep.core import BASIS, at, needs_merged
    from pisa_cli.sweep.grid import plan_options
    from pisa_cli.sweep.metrics import MetricSet
    from pisa_cli.sweep.run import sweep_jobs

    try:
        pipeline = load(settings.model, plan_options(settings.options))
        pipeline.stages(plan_options(settings.options))  # e.g. no second-pass timestep
        merged = None  # equal lambdas in bf16/fp16: the weights `pisa upscale` loads
        if needs_merged(pipeline, settings.options, settings.points()):
            merged = load(settings.model, at(settings.options, BASIS["pisa"]))
        metric_set = None
        if metric_names:
            metric_set = MetricSet(metric_names, str(pipeline.models.device), crop_border)
            metric_set.load()
    except PisaError as error:
        raise common.fail(error) from None
    counts: Counter = Counter()
    names = [str(job.source) for job in jobs]
    results = sweep_jobs(pipeline, jobs, settings, metric_set, merged)
    for result in track(results, len(jobs), names, quiet):
        counts[result.status] += 1
        for metric, (point, value) in result.best.items():
            common.say(
                f"{result.job.output}: best {metric} {value:.4g} at lambda_pix {point.pix:.2f}, "
                f"lambda_sem {point.sem:.2f}"
            )
    return counts


def _print_plans(jobs: list, settings, model_options) -> int:
    """--dry-run: the grid, then each image's plan; no model loaded. Returns how many
    images the sweep would refuse."""
    from pisa_cli.batch.plan import dry_run
    from pisa_cli.sweep.grid import plan_options

    grid = settings.grid
    common.say(
        f"grid {grid.spec}: {grid.size} points; per image 1 encode, UNet pix + pisa once, "
        f"{grid.size} decodes"
    )
    refused = 0
    try:
        planned = dry_run(jobs, plan_options(settings.options), model_options, settings.max_pixels)
        for job, plans in planned:
            if isinstance(plans, str):
                common.say(f"error: {plans}", err=True)
                refused += 1
            else:
                common.say(f"{job.source} -> {job.output}/")
                for index, plan in enumerate(plans):
                    prefix = "second pass, per point: " if index else ""
                    common.say_lines(prefix + plan.describe())
    except PisaError as error:
        raise common.fail(error) from None
    return refused
