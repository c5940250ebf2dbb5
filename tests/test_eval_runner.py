"""eval/runner.py as code: its audit hook judged event by event, and the program run on its own
(no isolation) to show the verdict protocol: the nonce reaches the status fd only after the tests."""

import json
import os
import subprocess
import sys

import pytest

from eval import runner


@pytest.mark.parametrize(
    ("event", "args"),
    [
        ("open", ("/etc/ds_eval_x", "w", 0)),
        ("open", ("/proc/self/mem", "r", 0)),
        ("open", ("relative_outside", "a", 0)),  # the test runs outside the workdir
        ("os.remove", ("/etc/ds_eval_x", -1)),
        ("os.rename", ("a", "/tmp/b", -1, -1)),
        ("ctypes.dlopen", ("libc.so.6",)),
        ("socket.connect", (None, ("127.0.0.1", 1))),
        ("os.fork", ()),
        ("sys.settrace", ()),
        ("gc.get_objects", ()),
        ("import", ("ctypes", None, [], [], [])),
        ("object.__setattr__", (object(), "__code__", None)),
        ("object.__getattr__", (object(), "tb_frame")),
    ],
)
def test_hook_refuses(tmp_path, event, args):
    hook = runner.make_hook(str(tmp_path))
    with pytest.raises(PermissionError):
        hook(event, args)


def test_hook_allows_the_workdir_and_reads(tmp_path):
    hook = runner.make_hook(str(tmp_path))
    hook("open", (str(tmp_path / "x"), "w", 0))
    hook("open", (str(tmp_path / "sub" / "y"), None, os.O_WRONLY | os.O_CREAT))
    hook("open", ("/etc/hostname", "r", 0))
    hook("os.remove", (str(tmp_path / "x"), -1))
    hook("import", ("json", None, [], [], []))
    with pytest.raises(ValueError, match="sys._getframe"):
        hook("sys._getframe", (None,))


def run_runner(tmp_path, program: str, test: str) -> tuple[int, bytes]:
    """The runner as its own program (mode `none`): exit status and what reached the status fd."""
    status_r, status_w = os.pipe()
    job = {
        "nonce": "ab" * 16,
        "status_fd": status_w,
        "rlimits": {},
        "program": program,
        "test": test,
        "check": "",
    }
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", runner.__file__, json.dumps({"mode": "none", "uid": None})],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(status_w,),
    )
    os.close(status_w)
    proc.communicate(json.dumps(job).encode(), timeout=60)
    with os.fdopen(status_r, "rb") as f:
        return proc.returncode, f.read()


def test_nonce_only_after_the_tests(tmp_path):
    assert run_runner(tmp_path, "x = 1\n", "assert x == 1\n") == (0, b"ab" * 16)
    rc, status = run_runner(tmp_path, "x = 1\n", "assert x == 2\n")
    assert rc != 0 and status == b""
    assert run_runner(tmp_path, "import os\nos._exit(0)\n", "assert False\n") == (0, b"")
