"""A run before any model: which inputs become which outputs, which are up to date
(resume), the header screen, the output folder's write probe, and --dry-run's plans.

Nothing here loads a model or prints: it returns what it found, and the CLI says it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pisa_cli.batch.families import model_identity
from pisa_cli.batch.runner import FAILED, SKIPPED, JobResult
from pisa_cli.batch.settings import run_settings
from pisa_cli.batch.shard import Shard
from pisa_cli.core.planning import ImagePlan, check_pixels
from pisa_cli.errors import ImageError, PisaError
from pisa_cli.imaging.discover import Discovery, Job, discover
from pisa_cli.imaging.manifest import RUN, Decision, Manifest
from pisa_cli.imaging.object_manifest import open_manifest
from pisa_cli.imaging.objects import KEY_MAX, ObjectPath, probe_prefix
from pisa_cli.options import (
    DEFAULT_MAX_PIXELS,
    BatchOptions,
    ModelOptions,
    SecondPassOptions,
    UpscaleOptions,
)


class OutputFolderError(PisaError):
    """The output folder cannot be created or written: nothing is run."""

    exit_code = 1


@dataclass
class RunPlan:
    """What a run will do, decided from names, headers and the manifest alone."""

    found: Discovery
    manifest: Manifest
    settings: dict = field(default_factory=dict)
    """What the outputs depend on, as the manifest records it."""
    to_run: list[Job] = field(default_factory=list)
    reasons: dict[Job, str] = field(default_factory=dict)
    """Why each job runs: new, settings changed, input changed, --overwrite."""
    skipped: list[JobResult] = field(default_factory=list)
    """Up-to-date outputs, and files pisa did not write (kept)."""
    listed: int = 0
    """Jobs the inputs hold, every share's (``found`` holds this share's only)."""

    @property
    def conflicts(self) -> list[JobResult]:
        """The failed results of jobs whose output would replace their input."""
        return [conflict_result(job) for job in self.found.conflicts]

    @property
    def failed_early(self) -> int:
        """Missing and unusable inputs (they have no result of their own)."""
        return len(self.found.missing) + len(self.found.unreadable)


def find_jobs(
    inputs: Sequence[Path], output: Path, batch: BatchOptions, shard: Shard | None = None
) -> RunPlan:
    """The jobs of ``inputs`` (outputs that the manifest knows are never taken as inputs);
    with ``shard``, only that share's (its outputs recorded in its own manifest part)."""
    shard = shard or Shard()
    manifest = open_manifest(output, rank=shard.index)
    found = discover(inputs, output, batch=batch, exclude=manifest.outputs())
    refuse_long_names(found, output)
    listed = len(found.jobs)
    if not shard.whole:  # inputs that fail before a job (missing...) are said by every share
        found.jobs = [job for job in found.jobs if shard.holds(job.output, output)]
        found.conflicts = [job for job in found.conflicts if shard.holds(job.output, output)]
    return RunPlan(found=found, manifest=manifest, listed=listed)


TEMP_NAME_EXTRA = len(".pisa-tmp-") + 7 + 1 + 8
"""What the writer's temporary file name adds to the output's extension (fsutil.atomic_path:
the prefix, a process id of up to 7 digits, a dash, mkstemp's 8 random characters)."""


def refuse_long_names(found: Discovery, output: Path) -> None:
    """Move the jobs whose output the file system of ``output`` could not name (a part of
    its path, or its writer's temporary file name, longer than the file system allows) from
    ``found.jobs`` to ``found.unreadable``, one line naming the input: refused before any
    model work, not after it."""
    if isinstance(output, ObjectPath):
        _refuse_long_keys(found, output)
        return
    name_max, path_max = _name_limits(output)
    jobs = []
    for job in found.jobs:
        parts = job.output.relative_to(output).parts if job.output.is_relative_to(output) else ()
        longest = max((len(os.fsencode(part)) for part in parts), default=0)
        temp = TEMP_NAME_EXTRA + len(os.fsencode(job.output.suffix))
        whole = len(os.fsencode(job.output.absolute()))
        if max(longest, temp) > name_max:
            found.unreadable.append(
                f"{job.source}: its output name would be {max(longest, temp)} bytes long, more "
                f"than the {name_max} the file system of {output} allows; rename the input or "
                "use a shorter --suffix"
            )
        elif whole >= path_max:
            found.unreadable.append(
                f"{job.source}: its output path would be {whole} bytes long, more than the "
                f"{path_max - 1} the system allows; choose a shorter -o"
            )
        else:
            jobs.append(job)
    found.jobs = jobs


def _refuse_long_keys(found: Discovery, output: ObjectPath) -> None:
    """``refuse_long_names`` on object storage: a key holds KEY_MAX bytes."""
    jobs = []
    for job in found.jobs:
        length = len(job.output.key.encode("utf-8", "surrogateescape"))
        if length > KEY_MAX:
            found.unreadable.append(
                f"{job.source}: its output key would be {length} bytes long, more than the "
                f"{KEY_MAX} object storage allows; choose a shorter -o or --suffix"
            )
        else:
            jobs.append(job)
    found.jobs = jobs


def _name_limits(folder: Path) -> tuple[int, int]:
    """(longest file name, longest path + 1) in bytes on the file system of ``folder`` (or
    of its nearest existing parent: -o may not exist yet); POSIX's usual 255 and 4096 when
    the system does not say."""
    for candidate in (folder, *folder.absolute().parents):
        if candidate.is_dir():
            try:
                return os.pathconf(candidate, "PC_NAME_MAX"), os.pathconf(candidate, "PC_PATH_MAX")
            except (OSError, ValueError, AttributeError):
                break
    return 255, 4096


def decide(
    plan: RunPlan, model: ModelOptions, options: UpscaleOptions, batch: BatchOptions
) -> RunPlan:
    """Which of ``plan``'s jobs run (and why) and which are skipped, from the manifest and
    this run's settings. Raises WeightsError when the weights cannot be found."""
    plan.settings = run_settings(options, batch, model_identity(model, options))
    plan.manifest.use_settings(plan.settings)
    plan.to_run, plan.reasons, plan.skipped = sort_jobs(
        plan.found.jobs, plan.manifest, batch.overwrite
    )
    return plan


def conflict_result(job: Job) -> JobResult:
    """The failed result of a job whose output would replace its input."""
    error = f"{job.source}: the output would replace the input; use --suffix or another --output"
    return JobResult(job=job, status=FAILED, error=error)


def sort_jobs(
    jobs: Iterable[Job], manifest: Manifest, overwrite: bool = False
) -> tuple[list[Job], dict[Job, str], list[JobResult]]:
    """(jobs to run, why each runs, results of the skipped ones), from the manifest."""
    to_run, reasons, skipped = [], {}, []
    for job in jobs:
        try:
            decision = manifest.decide(job.source, job.output, overwrite)
        except OSError as error:  # cannot tell: run it, the reader or writer will say why
            decision = Decision(RUN, f"cannot check the output ({error.strerror or error})")
        if decision.action == RUN:
            to_run.append(job)
            reasons[job] = decision.reason
        else:
            skipped.append(JobResult(job=job, status=SKIPPED, reason=decision.reason))
    return to_run, reasons, skipped


def screen(
    jobs: list[Job], options: UpscaleOptions, max_pixels: int
) -> tuple[list[Job], list[tuple[Job, str]]]:
    """(jobs from the first that can run on, refused jobs before it with their error):
    image headers are checked (readable, within ``max_pixels``, see ``check_pixels``) up to
    the first image that can run, so a batch of nothing but bad inputs fails in a moment,
    without loading the model. The images after the first good one are checked as they are
    read; so are the refused ones when the batch runs (their errors are the same)."""
    from pisa_cli.imaging.io import read_size

    refused = []
    for index, job in enumerate(jobs):
        try:
            check_pixels(job.source, read_size(job.source), options, max_pixels)
        except ImageError as error:
            refused.append((job, str(error)))
            continue
        return jobs[index:], refused
    return [], refused


def make_output_folder(output: Path, batch: BatchOptions) -> Path | None:
    """Create the output folder and prove it writable, before any model loads; remove what
    killed runs left there. Returns the topmost folder this call created (``output`` or a
    parent of it; None when ``output`` existed). Raises OutputFolderError."""
    from pisa_cli.fsutil import kind_of, probe_writable, remove_stale_temp_files

    if isinstance(output, ObjectPath):
        _probe_prefix(output)
        return None
    kind = kind_of(output, follow=True)
    if kind not in (None, "a folder"):  # mkdir would say "File exists"
        raise OutputFolderError(f"{output}: not a folder ({kind}); -o names the folder to write in")
    made = None
    for folder in (output, *output.parents):
        if folder.exists() or folder.is_symlink():
            break
        made = folder
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe_writable(output)
    except OSError as error:
        if made is not None:
            remove_empty_folder(made)
        reason = error.strerror or error
        raise OutputFolderError(
            f"{output}: cannot write into the output folder ({reason})"
        ) from None
    remove_stale_temp_files(output, recursive=batch.recursive)
    return made


def _probe_prefix(output: ObjectPath) -> None:
    """Prove the output prefix writable (an object put and deleted): no folder to make."""
    try:
        probe_prefix(output, f"{os.getpid()}-{os.urandom(4).hex()}")
    except Exception as error:  # the storage's own errors (credentials, no bucket) too
        reason = getattr(error, "strerror", None) or error
        raise OutputFolderError(
            f"{output}: cannot write into the output prefix ({reason})"
        ) from None


def remove_empty_folder(folder: Path) -> None:
    """Remove ``folder`` (made by this run) and the folders in it if nothing was written
    into them: a run that wrote nothing leaves none of the folders it made."""
    for below, _folders, _files in os.walk(folder, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(below)


def dry_run(
    jobs: Iterable[Job],
    options: UpscaleOptions,
    model: ModelOptions,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[Job, list[ImagePlan] | str]]:
    """The plans of each job (one per pass) from its image header, without loading a model;
    an image the run would refuse (``max_pixels``, see ``check_pixels``) gets its error.

    Channel widths come from the base model's configs when it is on disk, else from SD
    2.1-base's; the free memory is that of the device the run would use. The families (and
    so the tile grids) follow the weights (their layout, headers or keys).
    """
    from pisa_cli.core.families import family_of
    from pisa_cli.core.planning import model_widths
    from pisa_cli.imaging.io import read_size
    from pisa_cli.models.device import (
        free_memory,
        host_free_memory,
        resolve_device,
        resolve_dtype,
    )

    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    widths = model_widths(model.resolved_base_model())
    first = family_of(model.resolved_weights())
    kind = options.second_pass.kind
    then = family_of(options.second_pass.weights, "second") if kind == "tudsr" else first
    for job in jobs:
        try:
            size = read_size(job.source)
            check_pixels(job.source, size, options, max_pixels)
        except ImageError as error:
            yield job, str(error)
            continue
        free, host = free_memory(device), host_free_memory(device)
        itemsize = dtype.itemsize
        variants = first.first_variants(options)
        plans = [first.plan_image(size, options, widths, itemsize, free, host, variants)]
        if kind != "none":
            second = replace(options, scale=2, timestep=None, second_pass=SecondPassOptions())
            variants = ("second",) if kind == "tudsr" else plans[0].variants
            size = plans[0].resize.output_size
            free, host = free_memory(device), host_free_memory(device)
            plans.append(then.plan_image(size, second, widths, itemsize, free, host, variants))
        yield job, plans
