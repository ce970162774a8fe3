"""`pisa upscale`: the options become an UpscaleSpec; the batch plans, runs and sums up;
this module says what happens and sets the exit code."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import typer

from pisa_cli.batch.distributed import parse_devices
from pisa_cli.cli import common, spec, steps
from pisa_cli.cli.steps import execute, finish, plan, prepare_output
from pisa_cli.errors import PisaError

if TYPE_CHECKING:  # the batch imports torch: only when a command runs, not for --help
    from pisa_cli.batch.run import PipelineFactory


@spec.takes(
    spec.CONTEXT, spec.INPUTS, spec.MODEL, spec.SCALE, spec.LAMBDAS, spec.LOOK, spec.TIMESTEP,
    spec.TILES, spec.SECOND, spec.DEVICE, spec.OUTPUTS, spec.RANKS, spec.RUN,
)  # fmt: skip
def upscale_command(context: typer.Context, **values) -> None:
    """Upscale images with PiSA-SR: `pisa upscale photos/ -o upscaled/`.

    The output of photo.jpg is OUTPUT/photo.png, exactly --scale times the input size (2 x
    --scale with --second-pass), with its transparency, grey, 16 bits, ICC profile and EXIF
    kept. Outputs that exist and were
    made with the same settings are skipped, so an interrupted run resumes (Ctrl-C stops
    after the current image; twice abandons it). Exit code 0 when every image worked, 1
    when some failed, 2 for bad options, 3 when the model or weights cannot be loaded, 130
    when interrupted. Under torchrun, accelerate launch or srun each process runs its
    share (--shard RANK/WORLD_SIZE) and sums up its own part.
    """
    common.setup_logging(values["quiet"], values["verbose"])
    from pisa_cli.cli.launch import launch_of

    try:
        run = launch_of(spec.UpscaleSpec.parse(values), _visible_gpus)
    except PisaError as error:
        raise common.fail(error) from None
    if run.shard.index == 0:
        steps.warn_unusual(run.options, run.model.resolved_weights())  # by share 0
    load = steps.pipeline_factory(context)
    if run.devices and len(devices := parse_devices(run.devices)) == 1:  # no engine for one
        run = replace(run, devices="", model=replace(run.model, device=devices[0]))
    upscale(run, load)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def upscale(run: spec.UpscaleSpec, load: PipelineFactory) -> None:
    """One process: plan, run with a display, sum up; exits non-zero through typer.Exit."""
    start = time.perf_counter()
    planned = plan(run)
    if planned is None:
        return
    plan_, outcome = planned
    if plan_.to_run:
        prepare_output(run, outcome)
        stop = threading.Event()
        if run.ray or run.devices:
            steps.execute_on_ray(run, plan_, outcome, load, stop)
        else:
            execute(run, plan_, plan_.to_run, outcome, load, stop)
    outcome.seconds = time.perf_counter() - start
    finish(outcome, run)
