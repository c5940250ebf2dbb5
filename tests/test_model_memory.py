"""The fused loss stays far below the naive logits in memory (bench/loss_memory.py, in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # measures a process's peak memory

ROOT = Path(__file__).resolve().parents[1]


def test_loss_peak_memory_is_a_fraction_of_the_naive_logits() -> None:
    """V = 32k, 8192 targets, chunk 512: naive fp32 logits are 1000 MiB; the loss path must stay < 200 MiB.

    The bound is about 3 chunk buffers (62.5 MiB each) plus the gradients; the measured figure is an
    upper bound of the loss path's extra peak RSS (forward and backward, gradients included).
    """
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        str(ROOT / "bench" / "loss_memory.py"),
        "--vocab",
        "32000",
        "--targets",
        "8192",
        "--d-model",
        "64",
        "--chunk",
        "512",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["naive_logits_mib"] == 1000.0
    assert 0 < result["peak_extra_mib"] < 200.0, result
    assert 9.0 < result["loss"] < 12.0, result  # about log(32000) = 10.37 for near-random logits
