"""The `gpu` tier: every test under tests/gpu needs CUDA devices and is skipped on a machine without them.

Run it on a GPU host with `python -m pytest -m gpu tests/gpu` (README, "Multi-GPU / multi-node proof
run"); `bash tests/run.sh` deselects the marker, so CI never collects a skipped test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (the gpu tier runs on GPU hosts only)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(no_cuda)  # before any fixture (the module-scoped runs) is set up


@pytest.fixture
def gpus() -> int:
    """The GPUs the multi-rank checks use: DS_TRAIN_GPUS, else every device of this host."""
    return int(os.environ.get("DS_TRAIN_GPUS", torch.cuda.device_count()))
