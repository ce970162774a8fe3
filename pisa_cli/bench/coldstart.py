"""Cold start: a fresh `pisa upscale` process on local weights, to the model being ready and
to the first output, once with an empty cache and once with the merged UNet cached."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pisa_cli.bench import Row, scenario
from pisa_cli.bench.upscale import noise_photo
from pisa_cli.models.checkpoint import BRANCHES, GROUPS, adapter_name
from pisa_cli.models.synthetic import random_checkpoint, save_random_base

READY = "model ready"


def save_official_checkpoint(unet_folder: Path, path: Path) -> None:
    """A random PiSA-SR checkpoint in the official pickle layout for the saved UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder, subfolder="unet")
    checkpoint = random_checkpoint(unet, seed=1)
    raw: dict = {"state_dict_unet": dict(checkpoint.tensors)}
    for branch in BRANCHES:
        raw[f"lora_rank_unet_{branch}"] = checkpoint.ranks[branch]
        for group in GROUPS:
            raw[f"unet_lora_{group}_modules_{branch}"] = list(
                checkpoint.modules[adapter_name(group, branch)]
            )
    torch.save(raw, path)


_MAXRSS = "pisa-bench-maxrss"
_LAUNCHER = f"""
import os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"{_MAXRSS} {{usage.ru_maxrss}}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""Runs the measured command and reports its peak RSS. A child's peak counts the memory of
the process it was forked from (the page tables it starts with), and this benchmark's own
process holds a random model: a small launcher in between keeps that out of the figure."""


def _run(args: list[str], env: dict[str, str], output: Path) -> dict[str, float]:
    """Start the command; seconds to the READY log line, to the output file, to the end,
    and the process's peak resident memory."""
    start = time.perf_counter()
    launch = [sys.executable, "-c", _LAUNCHER, *args]
    process = subprocess.Popen(launch, env=env, stderr=subprocess.PIPE, text=True)
    marks: dict[str, float] = {}
    assert process.stderr is not None
    for line in process.stderr:
        if READY in line and "ready" not in marks:
            marks["ready"] = time.perf_counter() - start
        if line.startswith(_MAXRSS):
            marks["peak_rss_gib"] = int(line.split()[1]) * 1024 / 2**30  # Linux: KiB
    process.wait()
    marks["exit"] = time.perf_counter() - start
    if process.returncode != 0 or not output.exists():
        raise RuntimeError(f"cold start run failed with exit code {process.returncode}")
    marks["first_output"] = marks["exit"]  # one image: the output is the run's last act
    return marks


@scenario("cold-start")
def cold_start(device: torch.device, dtype: torch.dtype) -> list[Row]:
    """Process start to model ready and to the first 128->512 output, local safetensors
    weights, first with an empty cache, then with the merged UNet and prompt cached."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pisa-cold-") as folder:
        root = Path(folder)
        save_random_base(root / "base", "sd21-base", seed=0)
        save_official_checkpoint(root / "base", root / "pisa_sr.pkl")
        noise_photo(128).save(root / "in.png")
        env = {**os.environ, "PISA_CACHE_DIR": str(root / "cache")}
        dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        args = [sys.executable, "-m", "pisa_cli", "upscale", str(root / "in.png")]
        args += ["-o", str(root / "out"), "--base-model", str(root / "base")]
        args += ["--weights", str(root / "pisa_sr.pkl"), "--device", str(device)]
        args += ["--dtype", dtype_name[dtype]]
        for case in ("empty cache", "cached"):
            output = root / "out" / "in.png"
            output.unlink(missing_ok=True)
            marks = _run(args, env, output)
            row = Row("cold-start", f"{case}, {dtype_name[dtype]}", marks["exit"])
            row.figures.update({k: round(v, 2) for k, v in marks.items()})
            rows.append(row)
    return rows
