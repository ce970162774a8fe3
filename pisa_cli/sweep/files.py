"""The files of one image's sweep, written into its (staging) folder.

``pix0.50_sem1.30.png`` per grid point (unless --no-images), ``contact_sheet.png``,
``sweep.json`` (settings, grid, per-point files and metrics, best points), with metrics
``metrics.csv`` and ``heatmap_<metric>.png``, with --viewer ``viewer.html``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from pisa_cli import __version__
from pisa_cli.errors import ImageError
from pisa_cli.imaging.discover import Job
from pisa_cli.imaging.io import write_image, write_output
from pisa_cli.imaging.modes import Picture, compose
from pisa_cli.imaging.names import shown
from pisa_cli.sweep.core import BASIS, Prepared, Sweeper
from pisa_cli.sweep.grid import GridPoint
from pisa_cli.sweep.metrics import LOWER_IS_BETTER, MetricSet, best_points
from pisa_cli.sweep.settings import SweepSettings
from pisa_cli.sweep.sheet import cell_image, contact_sheet, heat_map
from pisa_cli.sweep.viewer import build_viewer, png_data_uri

CONTACT_SHEET = "contact_sheet.png"
SWEEP_JSON = "sweep.json"
METRICS_CSV = "metrics.csv"
VIEWER = "viewer.html"
OWN_FILES = ("pix*_sem*.png", "heatmap_*.png", CONTACT_SHEET, SWEEP_JSON, METRICS_CSV, VIEWER)
"""Name patterns of the files a sweep writes (an older sweep's leftovers are removed)."""


def write_sweep(
    folder: Path,
    job: Job,
    picture: Picture,
    sweeper: Sweeper,
    prepared: Prepared,
    settings: SweepSettings,
    metrics: MetricSet | None,
    truth: Image.Image | None,
) -> dict[str, tuple[GridPoint, float]]:
    """Decode every grid point and write all the files; return the best point per metric.

    A point's file is what `pisa upscale` writes for ``picture`` (the input as read) at its
    lambdas: grey stays grey, alpha is upscaled apart and re-attached, 16 bits stay 16 bits,
    ICC profile and EXIF carried. The sheet, metrics and viewer see its 8-bit colour."""
    grid = settings.grid
    cells: dict[GridPoint, Image.Image] = {}
    exact: dict[GridPoint, str] = {}
    basis: dict[str, Image.Image] = {}
    scores: list[dict[str, float]] = []
    for point, colour in sweeper.images(prepared, grid.points):
        pixels = compose(picture, colour)
        image = pixels.to_8bit().convert("RGB")
        if settings.images:
            write_output(pixels, folder / f"{point.name}.png")
            exact[point] = f"{point.name}.png"
        elif settings.viewer:
            exact[point] = png_data_uri(image)
        cells[point] = cell_image(image, settings.sheet)
        if metrics is not None:
            scores.append(metrics.measure(image, truth))
        basis.update({name: image for name, at in BASIS.items() if at == point})
    title = _title(job, prepared, settings)
    write_image(contact_sheet(cells, grid, title), folder / CONTACT_SHEET)
    best: dict[str, tuple[GridPoint, float]] = {}
    if metrics is not None:
        best = _write_metrics(folder, grid.points, scores, metrics, title, settings)
    if settings.viewer:
        missing = {name: at for name, at in BASIS.items() if name not in basis}
        by_point = {at: name for name, at in missing.items()}
        for point, colour in sweeper.images(prepared, list(missing.values())):
            basis[by_point[point]] = compose(picture, colour).to_8bit().convert("RGB")
        html = build_viewer(
            job.source.name, " · ".join(title[1:]), grid, basis, prepared.bicubic(), exact
        )
        _write_text(folder / VIEWER, html)
    record = _record(job, prepared, settings, exact, scores, best, metrics)
    _write_text(folder / SWEEP_JSON, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return best


def _title(job: Job, prepared: Prepared, settings) -> list[str]:
    (iw, ih), (ow, oh) = prepared.plan.resize.input_size, prepared.output_size
    options = settings.options
    grid = settings.grid
    return [
        f"{shown(job.source.name)}: {iw}x{ih} -> {ow}x{oh}",  # drawn on one line
        f"{len(grid.pix)} x {len(grid.sem)} lambdas, colour fix {options.color_fix}"
        + (f", then x2 {options.second_pass.kind} pass" if prepared.second_pass else ""),
        "each point decoded exactly; encoder once, UNet pix + pisa once",
    ]


def _write_metrics(folder, points, scores, metrics: MetricSet, title, settings):
    best_rows = best_points(scores, metrics.names)
    best = {name: (points[row], scores[row][name]) for name, row in best_rows.items()}
    try:
        with open(folder / METRICS_CSV, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["lambda_pix", "lambda_sem", "file", *metrics.names])
            for point, row in zip(points, scores, strict=True):
                file = f"{point.name}.png" if settings.images else ""
                values = [_csv_number(row[name]) for name in metrics.names]
                writer.writerow([f"{point.pix:.2f}", f"{point.sem:.2f}", file, *values])
    except OSError as error:
        raise ImageError(f"{folder / METRICS_CSV}: cannot write ({error.strerror})") from None
    for name in metrics.names:
        values = {point: row[name] for point, row in zip(points, scores, strict=True)}
        at = best.get(name, (None, math.nan))[0]
        better = "lower" if name in LOWER_IS_BETTER else "higher"
        lines = [f"{title[0]}: {name.upper()} ({better} is better)", *title[1:2]]
        if at is not None:
            lines.append(f"best {_number(best[name][1])} at pix {at.pix:.2f}, sem {at.sem:.2f}")
        picture = heat_map(values, settings.grid, lines, name in LOWER_IS_BETTER, at, _number)
        write_image(picture, folder / f"heatmap_{name}.png")
    return best


def _number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _csv_number(value: float) -> str:
    return "" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:.6g}"


def _json_number(value: float) -> float | str | None:
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else "inf"


def _record(job, prepared: Prepared, settings, exact, scores, best, metrics) -> dict:
    grid, options = settings.grid, settings.options
    points = []
    for index, point in enumerate(grid.points):
        entry: dict = {"lambda_pix": point.pix, "lambda_sem": point.sem}
        entry["file"] = f"{point.name}.png" if settings.images else None
        if scores:
            entry["metrics"] = {k: _json_number(v) for k, v in scores[index].items()}
        points.append(entry)
    option_fields = asdict(options)
    for name in ("lambda_pix", "lambda_sem"):
        option_fields.pop(name)
    return {
        "pisa_cli": __version__,
        "input": str(job.source),
        "input_size": list(prepared.plan.resize.input_size),
        "output_size": list(prepared.output_size),
        "settings": option_fields,
        "model": asdict(settings.model),
        "grid": {"spec": grid.spec, "pix": list(grid.pix), "sem": list(grid.sem)},
        "points": points,
        "files": {
            "contact_sheet": CONTACT_SHEET,
            "metrics": METRICS_CSV if metrics is not None else None,
            "heatmaps": [f"heatmap_{n}.png" for n in metrics.names] if metrics else [],
            "viewer": VIEWER if settings.viewer else None,
        },
        "ground_truth": str(settings.gt_dir) if settings.gt_dir and metrics else None,
        "best": {
            name: {"lambda_pix": at.pix, "lambda_sem": at.sem, "value": _json_number(value)}
            for name, (at, value) in best.items()
        },
        "cost": {
            "unet_calls": prepared.unet_calls,
            "unet_passes": ["pix", "pisa"]
            + (["pisa merged"] if prepared.merged_eps is not None else []),
            "decoded_points": prepared.decodes,
            "decoder_batch": prepared.decode_batch,
        },
        "plan": {
            "latent_size": list(prepared.plan.latent_size),
            "unet_tiles": len(prepared.plan.unet.tiles),
            "tile_batch": prepared.plan.tile_batch,
            "encoder_tile": prepared.plan.encoder_tile,
            "decoder_tile": prepared.plan.decoder_tile,
        },
        "timings": {k: round(v, 3) for k, v in prepared.timings.items()},
        "notes": prepared.notes,
    }


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise ImageError(f"{path}: cannot write ({error.strerror})") from None
