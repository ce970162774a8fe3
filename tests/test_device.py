"""Device helpers: the heap that keeps freed memory, and free memory that counts it."""

from __future__ import annotations

import sys

import pytest
import torch

from pisa_cli.models import device

MIB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_stay_in_the_heap_and_count_as_free():
    if not device.keep_freed_memory():
        pytest.skip("not glibc")
    before = device.heap_free_bytes()
    block = torch.ones(64 * MIB, dtype=torch.uint8)  # above glibc's default mmap threshold
    del block
    kept = device.heap_free_bytes() - before
    assert kept >= 60 * MIB  # reused by the next activation, no page faults
    # the plan's free memory counts it: MemAvailable no longer does
    assert device.free_memory(torch.device("cpu")) >= device.available_ram() + kept - 16 * MIB
