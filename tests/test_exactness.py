"""A batch gives the one-by-one outputs bit for bit in bf16 on a CPU, whatever its
instruction set: AVX2, AVX-512, AVX-512 with bf16, AMX. oneDNN, MKL and ATen pick their
kernels at start-up by the CPU, so the instruction sets below this CPU's run in
subprocesses with each library capped (started together: they take a core each)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import batch_differences, environment

FIXES = ("adain", "wavelet")

ISAS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx512-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}
"""CPUs without AMX: avx512 runs oneDNN's emulated bf16, avx512-bf16 its AVX-512 bf16
kernels, avx2 ATen's own. Each variable is a ceiling: a CPU below it runs its best."""

CHECK = (
    "import json, torch; from tests.helpers import batch_differences; "
    f"print(json.dumps([torch.backends.cpu.get_cpu_capability(), batch_differences({FIXES})]))"
)


def capped(isa: str) -> dict[str, str]:
    env = {**environment(), **ISAS[isa]}
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        env["ATEN_CPU_CAPABILITY"] = "avx2"  # ATen trusts it without asking: only lower it
    return env


@pytest.fixture(scope="module")
def checks():
    """The check running under each instruction set, all started at once."""
    runs = {
        isa: subprocess.Popen(
            [sys.executable, "-c", CHECK],
            env=capped(isa),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for isa in ISAS
    }
    yield runs
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.wait()


@pytest.mark.slow
def test_a_batch_of_16_bit_images_is_bit_for_bit_on_this_cpu(checks):
    # (``checks``: the subprocesses run while this does)
    # the colour fix's mean used to follow the memory layout, and the decoder gives a
    # channels-last image alone and NCHW crops in a batch: 6e-8 apart, a 16-bit level now
    # and then (wherever the rounding fell near a level, on any instruction set)
    assert batch_differences(FIXES) == dict.fromkeys(FIXES, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("isa", list(ISAS))
def test_a_batch_is_bit_for_bit_on_every_instruction_set(checks, isa):
    out, err = checks[isa].communicate(timeout=600)
    assert checks[isa].returncode == 0, err
    capability, worst = json.loads(out.splitlines()[-1])
    if "ATEN_CPU_CAPABILITY" in capped(isa):
        assert capability == "AVX2"
    assert worst == dict.fromkeys(FIXES, 0.0)
