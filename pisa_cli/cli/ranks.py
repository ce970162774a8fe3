"""`pisa upscale` as one rank of several (torchrun, accelerate launch, srun, --devices):
rank 0 plans and hands out the images, every rank runs its share (``batch.ranks``), rank 0
collects the results and prints the one summary and report."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import typer

from pisa_cli.batch.distributed import RankEnv
from pisa_cli.batch.run import INTERRUPTED_EXIT, PipelineFactory
from pisa_cli.cli import common, spec, steps
from pisa_cli.cli.signals import flag_on_signals
from pisa_cli.errors import PisaError


def upscale_as_rank(env: RankEnv, run: spec.UpscaleSpec, load: PipelineFactory) -> None:
    """Run this rank's part of the batch; on rank 0, print the summary and write the report."""
    import torch

    from pisa_cli.batch.distributed import join, rank_device
    from pisa_cli.models.device import make_current

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = rank_device(run.model.device, env, gpus)
    run = replace(run, model=replace(run.model, device=device))
    try:
        make_current(torch.device(device))
        group = join(env, torch.device(device).type)
    except PisaError as error:
        raise common.fail(error) from None
    try:
        if env.rank == 0:
            _lead(group, run, load)
        else:
            _follow(group, run, load)
    except PisaError as error:  # a lost rank 0 or store
        raise common.fail(error) from None
    finally:
        group.close()


def _warn(text: str) -> None:
    common.say(f"warning: {text}", err=True)


def _share_run(run: spec.UpscaleSpec, load: PipelineFactory, quiet: bool, stop):
    from pisa_cli.batch.ranks import ShareRun
    from pisa_cli.cli.progress import display

    return ShareRun(
        run.model, run.options, run.batch, load, lambda total: display(total, quiet), stop
    )


def _lead(group, run: spec.UpscaleSpec, load: PipelineFactory) -> None:
    from pisa_cli.batch import ranks
    from pisa_cli.cli.signals import stop_on_signals

    start = time.perf_counter()
    try:
        planned = steps.plan(run)
        assert planned is not None
        plan, outcome = planned
        if plan.to_run:  # before any rank writes: stale temp files, a write probe
            steps.prepare_output(run, outcome)
    except typer.Exit as stop:
        ranks.abort(group, stop.exit_code or 1)
        raise
    jobs = ranks.hand_out(group, plan, run.batch)
    stop = threading.Event()
    how = _share_run(run, load, run.quiet, stop)
    with stop_on_signals(stop, _warn):
        own, error = ranks.run_share(group, jobs[0], plan.reasons, plan.manifest, how)
    if error:
        common.say(f"error: {error}", err=True)
    stopped = threading.Event()
    with flag_on_signals(stopped):
        lost = ranks.collect(group, outcome, own, jobs, plan, stopped.is_set)
    outcome.seconds = time.perf_counter() - start
    for rank, why in lost.items():
        common.say(
            f"error: {why}: its {len(jobs[rank])} images are counted as not done (those it "
            "finished are kept and skipped by the next run)",
            err=True,
        )
    steps.finish(outcome, run)


def _follow(group, run: spec.UpscaleSpec, load: PipelineFactory) -> None:
    from pisa_cli.batch import ranks
    from pisa_cli.cli.signals import stop_on_signals
    from pisa_cli.imaging.manifest import Manifest

    share = ranks.receive_share(group, run.output)
    if share.exit_code is not None:
        raise typer.Exit(share.exit_code)  # rank 0 printed why
    manifest = Manifest(run.output, share.settings, rank=group.env.rank)
    stop = threading.Event()
    how = _share_run(run, load, True, stop)
    with stop_on_signals(stop, _warn):
        own, error = ranks.run_share(group, list(share.jobs), share.reasons, manifest, how)
    ranks.send_report(group, own, share)
    if error:
        raise common.fail(PisaError(error))
    if own.interrupted:
        raise typer.Exit(INTERRUPTED_EXIT)
