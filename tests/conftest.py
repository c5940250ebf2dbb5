"""Shared test setup: CPU DeepSpeed, quiet logs, deterministic threads."""

import faulthandler
import os
import sys

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# A test that hangs (a lost peer, a stuck child) must fail the run with the stacks, not hold CI until its
# limit: past TEST_LIMIT_S the interpreter writes every thread's traceback to the real stderr and exits.
TEST_LIMIT_S = float(os.environ.get("DS_TRAIN_TEST_LIMIT_S", "900"))
_REAL_STDERR: list[int] = []


def pytest_configure(config):
    _REAL_STDERR.append(os.dup(sys.stderr.fileno()))  # before any test's capture replaces fd 2


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True, file=_REAL_STDERR[0])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
