"""The sandbox: the reference solutions pass through the codec, hostile samples are contained.

Every hostile sample below must be scored as a failure while the scorer, its files, its
environment and the good samples that run beside it stay intact.
"""

import os
import socket
import sys

import psutil
import pytest

from eval.problems import completion_after, load_benchmark, reference_lin
from eval.sandbox import Limits, mechanism, run_many, run_program

pytestmark = pytest.mark.slow  # every test here runs programs in the sandbox

SECRET = "ds-eval-test-secret-4f1c"
GOOD_TEST = "assert f(2) == 4\n"


def test_canonical_humaneval_linearized_round_trip_all_pass():
    """linearize -> delinearize of every canonical solution, run with the problem's tests."""
    problems = load_benchmark("humaneval")
    jobs = [
        (p.prompt + completion_after(p.signature_lin, reference_lin(p)), p.test, p.check) for p in problems
    ]
    outcomes = run_many(jobs, Limits(timeout=10), workers=4)
    failed = {p.task_id: o.result for p, o in zip(problems, outcomes) if not o.passed}
    assert failed == {}
    assert len(outcomes) == 164


def test_mbpp_reference_solutions_pass_except_known_failures():
    """The test split's reference code (body + helpers after the derived prompt) passes, except
    MBPP/341, which expects a set's iteration order (see eval/data/MBPP_SOURCE.md; 596 and 642 are
    outside the test split). MBPP/123 needs ~5 s, hence the long timeout here."""
    problems = load_benchmark("mbpp")
    outcomes = run_many(
        [(p.prompt + p.solution, p.test, p.check) for p in problems], Limits(timeout=30), workers=4
    )
    failed = {p.task_id for p, o in zip(problems, outcomes) if not o.passed}
    assert failed == {"MBPP/341"}


def _hostile_programs(victim_file, victim_dir, port):
    """name -> (program, test, check); each would pass only if the sandbox were broken."""
    wrong = "def f(x):\n    return 0\n"
    return {
        "infinite_loop": ("def f(x):\n    while True:\n        pass\n", GOOD_TEST, ""),
        "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", GOOD_TEST, ""),
        "subprocess_bomb": (
            (
                "import subprocess, sys\nwhile True:\n"
                "    subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
            ),
            GOOD_TEST,
            "",
        ),
        "memory_bomb": ("blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 26))\n", GOOD_TEST, ""),
        "huge_allocation": ("x = bytearray(1 << 36)\n" + wrong, GOOD_TEST, ""),
        "write_outside": (f"open({str(victim_dir / 'pwned')!r}, 'w').write('x')\n" + wrong, GOOD_TEST, ""),
        "write_tmp": (
            "import os\nfd = os.open('/tmp/ds_eval_pwned', os.O_WRONLY | os.O_CREAT)\n" + wrong,
            GOOD_TEST,
            "",
        ),
        "delete_file": (f"import os\nos.remove({str(victim_file)!r})\n" + wrong, GOOD_TEST, ""),
        "delete_tree": (f"import shutil\nshutil.rmtree({str(victim_dir)!r})\n" + wrong, GOOD_TEST, ""),
        "socket": (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'leak')\n" + wrong,
            GOOD_TEST,
            "",
        ),
        "env_secret": (
            (
                "import os\nfound = str(dict(os.environ))\n"
                "try:\n    found += open('/proc/%d/environ' % os.getppid()).read()\n"
                "except Exception as e:\n    print(e)\nprint(found)\n"
                "def f(x):\n    return 4 if 'ds-eval-test-secret' in found else 0\n"
            ),
            GOOD_TEST,
            "",
        ),
        "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + wrong, GOOD_TEST, ""),
        "kill_everything": ("import os, signal\nos.kill(-1, signal.SIGKILL)\n" + wrong, GOOD_TEST, ""),
        "huge_stdout": ("while True:\n    print('x' * 100000)\n", GOOD_TEST, ""),
        "sys_exit_0": ("import sys\nsys.exit(0)\n" + wrong, GOOD_TEST, ""),
        "os_exit_0": ("import os\nos._exit(0)\n" + wrong, GOOD_TEST, ""),
        "exit_0_from_call": ("import os\ndef f(x):\n    os._exit(0)\n", GOOD_TEST, ""),
        "excepthook_exit_0": (
            "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n" + wrong,
            GOOD_TEST,
            "",
        ),
        "patch_builtins": (
            "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
            "builtins.abs = lambda v: 0\n__builtins__.len = lambda v: 3\n" + wrong,
            "assert abs(f(3) - 9) < 1e-9\nassert len(f(3)) == 3\n",
            "",
        ),
        "settrace_skip_asserts": (
            "import sys\n"
            "def tracer(frame, event, arg):\n"
            "    if event == 'line' and frame.f_code.co_filename == '<test>':\n"
            "        frame.f_lineno = frame.f_lineno + 1\n"
            "    return tracer\n"
            "sys.settrace(tracer)\n" + wrong,
            "assert f(2) == 4\npass\n",
            "",
        ),
        "fake_nonce": (
            (
                "import gc, os, re, sys\nguesses = []\n"
                "for attempt in (lambda: os.read(0, 4096), lambda: gc.get_objects(),\n"
                "                lambda: sys._getframe(0).f_back.f_locals,\n"
                "                lambda: open('/proc/self/cmdline').read()):\n"
                "    try:\n        guesses.append(repr(attempt()))\n"
                "    except Exception as e:\n        print(e)\n"
                "blob = ' '.join(guesses)\n"
                "for token in re.findall('[0-9a-f]{32}', blob) or ['0' * 32]:\n"
                "    for fd in range(1, 10):\n"
                "        try:\n            os.write(fd, token.encode())\n"
                "        except OSError:\n            pass\n"
                "os._exit(0)\n"
            ),
            GOOD_TEST,
            "",
        ),
        # the next three would pass only if the attack worked: `f` is right only then
        "signal_frame": (
            (
                "import signal, time\nfound = []\n"
                "try:\n"
                "    signal.signal(signal.SIGALRM, lambda s, frame: found.append(frame.f_back))\n"
                "    signal.setitimer(signal.ITIMER_REAL, 0.001)\n"
                "    time.sleep(0.2)\n"
                "except Exception as e:\n    print(e)\n"
                "def f(x):\n    return 4 if found else 0\n"
            ),
            GOOD_TEST,
            "",
        ),
        "traceback_frame": (
            (
                "ok = False\ntry:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
                "    try:\n        ok = 'nonce' in e.__traceback__.tb_frame.f_back.f_locals\n"
                "    except Exception as e2:\n        print(e2)\n"
                "def f(x):\n    return 4 if ok else 0\n"
            ),
            GOOD_TEST,
            "",
        ),
        "ctypes": (
            (
                "ok = False\ntry:\n    import ctypes\n    ok = ctypes.CDLL(None).getpid() > 0\n"
                "except Exception as e:\n    print(e)\n"
                "def f(x):\n    return 4 if ok else 0\n"
            ),
            GOOD_TEST,
            "",
        ),
    }


GOOD = {
    "good_1": ("def f(x):\n    return x * 2\n", GOOD_TEST, ""),
    "good_2": ("import math\ndef f(x):\n    return int(math.pow(x, 2))\n", GOOD_TEST, ""),
    "good_3": (
        "def f(x):\n    return x + 2\n",
        "def check(candidate):\n    assert candidate(2) == 4\n",
        "check(f)",
    ),
    "good_heapq": (
        "from collections import Counter\ndef f(x):\n    return Counter('aab').most_common(1)[0][1] * x\n",
        GOOD_TEST,
        "",
    ),
}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """Run every hostile sample and the good ones together on one pool, as a scorer would."""
    victim_dir = tmp_path_factory.mktemp("victim")
    victim_file = victim_dir / "keep.txt"
    victim_file.write_text("precious")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    old = os.environ.get("DS_EVAL_SECRET")
    os.environ["DS_EVAL_SECRET"] = SECRET
    try:
        cases = {**_hostile_programs(victim_file, victim_dir, listener.getsockname()[1]), **GOOD}
        names = list(cases)
        outcomes = run_many([cases[n] for n in names], Limits(timeout=2), workers=4)
    finally:
        if old is None:
            os.environ.pop("DS_EVAL_SECRET")
        else:
            os.environ["DS_EVAL_SECRET"] = old
    try:
        connection, _ = listener.accept()
        connection.close()
        connected = True
    except TimeoutError:
        connected = False
    listener.close()
    yield {
        "outcomes": dict(zip(names, outcomes)),
        "victim_file": victim_file,
        "victim_dir": victim_dir,
        "connected": connected,
    }


@pytest.mark.parametrize(
    "name", list(_hostile_programs(__import__("pathlib").Path("/x"), __import__("pathlib").Path("/y"), 1))
)
def test_hostile_sample_fails(hostile_run, name):
    outcome = hostile_run["outcomes"][name]
    assert not outcome.passed, f"{name} passed: {outcome}"
    assert SECRET not in outcome.stdout + outcome.stderr
    assert (
        len(outcome.stdout) <= Limits().output_kb * 1024 and len(outcome.stderr) <= Limits().output_kb * 1024
    )


def test_hostile_effects_contained(hostile_run):
    outcomes = hostile_run["outcomes"]
    assert outcomes["infinite_loop"].result == "timed out"
    assert outcomes["huge_stdout"].result == "failed: output limit exceeded"
    assert outcomes["huge_allocation"].result == "failed: MemoryError"
    # growing 64 MiB at a time hits the address-space limit, unless the clock runs out first
    assert outcomes["memory_bomb"].result in ("failed: MemoryError", "timed out")
    for name in ("sys_exit_0", "os_exit_0", "exit_0_from_call", "excepthook_exit_0", "fake_nonce"):
        assert outcomes[name].result == "failed: the program exited before its tests finished", name
    assert hostile_run["victim_file"].read_text() == "precious"
    assert not (hostile_run["victim_dir"] / "pwned").exists()
    assert not os.path.exists("/tmp/ds_eval_pwned")
    assert not hostile_run["connected"], "a sample reached a socket of the host"
    assert psutil.Process().is_running()
    if os.geteuid() == 0:  # private uids: nothing of any sample survives
        assert not [
            p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real >= 100_000
        ]


def test_good_samples_beside_hostile_ones_pass(hostile_run):
    for name in GOOD:
        assert hostile_run["outcomes"][name].passed, hostile_run["outcomes"][name]


def test_scorer_still_healthy_after_the_suite(hostile_run):
    assert run_program("def f(x):\n    return 2 * x\n", GOOD_TEST).passed
    assert mechanism().describe()


def test_verdicts_need_the_tests_to_run():
    assert run_program("x = 1\n", "assert x == 1\n").passed
    assert not run_program("x = 1\n", "assert x == 2\n").passed
    assert run_program("x = 1\n", "assert x == 2\n").result == "failed: AssertionError"
    assert run_program("def f(:\n", GOOD_TEST).result.startswith("failed: SyntaxError")
    outcome = run_program("print('hello')\nimport sys\nprint('oops', file=sys.stderr)\n")
    assert outcome.passed and outcome.stdout == "hello\n" and outcome.stderr == "oops\n"
    assert sys.executable  # the scorer's own interpreter is what runs the programs
