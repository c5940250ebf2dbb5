"""The program that runs inside the sandbox (its text is handed to `python -I -S -c`).

The scorer (`eval/sandbox.py`) starts this module's source as a fresh interpreter inside the
isolation it chose, with one command-line argument, a JSON *config* (no secret in it):

- `mode`: `bwrap` (bubblewrap already built the namespaces and mounts), `unshare` (util-linux
  `unshare` made the namespaces; `isolate` below makes the mounts) or `none` (the user's explicit
  unsafe opt-out: only the audit hook and rlimits).
- `uid`: a fresh private uid to drop to (the scorer runs as root), else None.
- `workdir`, `covers`, `binds`, `writable`, `disk_mb`: the mount layout (`unshare` mode only).

The *job* (program, tests, check call, rlimits, the status fd and a random nonce) comes on stdin,
which is drained before any sample code runs. The runner makes itself non-dumpable, so the kernel
refuses its memory and fds (`/proc/self/mem`, `/proc/self/fd`) to the sample's uid; it runs the
sample, then the tests with a fresh copy of the builtins, then the check call, and only then writes
the nonce to the status fd. The scorer counts a pass only for exit status 0 with the nonce.

Standard library only: it runs with `-I -S` under a uid that may see nothing but the interpreter.
"""

from __future__ import annotations

import _imp
import _signal
import builtins
import ctypes
import json
import os
import resource
import sys
import warnings

SETUP_FAILED = 3  # exit status when the sandbox could not be set up (stderr starts with "sandbox:")
INNER_UID = 1000  # the uid a program has inside a user namespace (never 0: see `isolate`)
STATUS_FD = 3

# <linux/sched.h>, <linux/mount.h>, <linux/prctl.h>
CLONE_NEWUSER = 0x10000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 0x2, 0x4, 0x1000, 0x4000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_RECURSIVE = 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
PR_SET_DUMPABLE = 4

BLOCKED_EVENTS = frozenset(
    (
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.kill",
        "os.killpg", "os.setuid", "subprocess.Popen", "pty.spawn", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "sys.monitoring.register_callback", "sys.monitoring.set_events",
        "sys.monitoring.set_local_events", "sys.addaudithook", "code.__new__", "function.__new__",
        "cpython.PyInterpreterState_New", "_posixsubprocess.fork_exec", "os.chroot",
        "resource.setrlimit", "resource.prlimit", "mmap.__new__", "webbrowser.open",
    )
)  # fmt: skip
WRITE_EVENTS = frozenset(
    (
        "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
        "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move",
        "os.chflags", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod",
    )
)  # fmt: skip


def main(argv: list[str]) -> None:
    config = json.loads(argv[0])
    try:
        if config["mode"] == "unshare" and not config.get("isolated"):
            isolate(config)  # returns only as root; otherwise re-executes this program
        elif config.get("uid") is not None:
            drop_to(config["uid"])
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            fail(libc, "prctl(PR_SET_DUMPABLE)")
    except OSError as err:
        os.write(2, f"sandbox: {err}\n".encode())
        os._exit(SETUP_FAILED)
    del libc
    sys.modules.pop("ctypes", None)  # the hook refuses every ctypes call anyway
    run_job()


def fail(libc, what: str) -> None:
    errno = ctypes.get_errno()
    raise OSError(errno, f"{what} failed: {os.strerror(errno)}")


def drop_to(uid: int) -> None:
    """Become the private uid (the scorer is root): no capabilities, no supplementary groups."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def isolate(config: dict) -> None:
    """The mounts bubblewrap would make, inside the namespaces `unshare` made.

    Fresh tmpfs over `covers` (the temp dirs, the scorer's home, directories the private uid may not
    cross) and the working directory, the interpreter's directories bound back in through fds
    opened before they were covered, everything read-only but `writable`, `/proc` and the working
    directory. As root the runner then drops to the private uid; as an ordinary user it enters a
    second user namespace where it is uid INNER_UID (root unmapped, so /proc/self of a non-dumpable
    process belongs to nobody it can become) and executes itself again, which drops every
    capability of the first namespace.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    workdir = config["workdir"]
    kept = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in config["binds"]}
    size = config["disk_mb"] << 20
    for cover in config["covers"]:  # hidden ones stay small: a user namespace's uid may write them
        if not os.path.isdir(cover):
            continue
        options = f"mode=1777,size={size}" if cover in config["writable"] else "mode=755,size=1048576"
        mount(libc, b"tmpfs", cover, b"tmpfs", MS_NOSUID | MS_NODEV, options.encode())
    for path, fd in kept.items():
        os.makedirs(path, exist_ok=True)
        mount(libc, f"/proc/self/fd/{fd}".encode(), path, None, MS_BIND | MS_REC, None)
        os.close(fd)
    os.makedirs(workdir, exist_ok=True)
    mount(libc, b"tmpfs", workdir, b"tmpfs", MS_NOSUID | MS_NODEV, f"mode=777,size={size}".encode())
    rdonly = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID  # not NODEV: /dev/null is a device
    set_mount_attr(libc, "/", AT_RECURSIVE, rdonly, 0)
    for path in [*config["writable"], workdir, "/proc"]:
        if os.path.isdir(path):
            set_mount_attr(libc, path, 0, 0, MOUNT_ATTR_RDONLY)
    os.chdir(workdir)
    if config.get("uid") is not None:
        drop_to(config["uid"])
        return
    if libc.unshare(CLONE_NEWUSER) != 0:
        fail(libc, "unshare(CLONE_NEWUSER)")
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{INNER_UID} 0 1"),
        ("gid_map", f"{INNER_UID} 0 1"),
    ):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    source = argv[argv.index(b"-c") + 1]  # python -I -S -c SOURCE CONFIG
    config["isolated"] = True
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", source, json.dumps(config)])


def mount(libc, source: bytes, target: str, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    if libc.mount(source, os.fsencode(target), fstype, flags, data) != 0:
        fail(libc, f"mount on {target}")


def set_mount_attr(libc, path: str, flags: int, attr_set: int, attr_clr: int) -> None:
    attr = (ctypes.c_uint64 * 4)(attr_set, attr_clr, 0, 0)
    at_fdcwd = -100
    if libc.syscall(SYS_MOUNT_SETATTR, at_fdcwd, os.fsencode(path), flags, attr, ctypes.sizeof(attr)) != 0:
        fail(libc, f"mount_setattr on {path}")


def run_job() -> None:
    """Read the job, set the limits, run program + tests + check; the nonce only after all three."""
    chunks = []
    while True:  # the whole job, straight from the pipe: no buffer object keeps a copy
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    job = json.loads(b"".join(chunks))
    nonce = job.pop("nonce").encode()
    del chunks, chunk
    if job["status_fd"] != STATUS_FD:
        os.dup2(job["status_fd"], STATUS_FD)
        os.close(job["status_fd"])
    for name, value in job["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115 -- the program's stdin
    with warnings.catch_warnings():  # e.g. spwd on 3.12 warns that it is deprecated
        warnings.simplefilter("ignore")
        for name in sys.builtin_module_names:  # loaded now: creating builtin modules is refused later
            if name not in sys.modules and name != "xxsubtype":
                __import__(name)
    try:
        phases = [compile(job[k], "<" + k + ">", "exec") for k in ("program", "test", "check")]
    except SyntaxError as err:
        os.write(2, f"SyntaxError: {err.msg} (line {err.lineno})\n".encode())
        os._exit(1)
    disable_signals()
    sys.addaudithook(make_hook(os.path.realpath(os.getcwd())))
    run, write, exit_, clean = exec, os.write, os._exit, dict(builtins.__dict__)
    sample = {"__name__": "__main__", "__builtins__": builtins}
    del job
    run(phases[0], sample)
    tests = dict(sample)
    tests["__builtins__"] = dict(clean)
    run(phases[1], tests)
    run(phases[2], tests)
    write(STATUS_FD, nonce)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001, S110 -- the verdict is written; output is best effort
            pass
    exit_(0)


def disable_signals() -> None:
    """Python signal handlers receive frames: refuse installing them, and new builtin modules."""

    def refuse(*args, **kwargs):
        raise PermissionError("sandbox: not allowed here")

    _signal.signal = refuse
    _imp.create_builtin = _imp.exec_builtin = refuse
    if "signal" in sys.modules:
        sys.modules["signal"].signal = refuse


def make_hook(workdir: str):
    """The audit hook: a second layer under the kernel's, and the only guard of the verdict's
    Python-level secrets (frames, gc, tracing, ctypes). It judges path strings only: writes through
    `dir_fd` or by modules without audit events are the mounts' job."""
    realpath, join, getcwd, fsdecode = os.path.realpath, os.path.join, os.getcwd, os.fsdecode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        path = realpath(join(getcwd(), fsdecode(path)))
        return path == workdir or path.startswith(workdir + "/")

    def hook(event, args):
        if event in BLOCKED_EVENTS or event.startswith(("socket.", "ctypes.", "_ctypes.")):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "sys._getframe":
            raise ValueError("sandbox: sys._getframe is not allowed")
        if event == "object.__getattr__" and "frame" in str(args[1]):
            raise PermissionError("sandbox: frame objects are not reachable")
        if event == "object.__setattr__" and args[1] == "__code__":
            raise PermissionError("sandbox: replacing code objects is not allowed")
        if event == "import" and str(args[0]).split(".")[0] in ("ctypes", "_ctypes", "_testcapi"):
            raise PermissionError(f"sandbox: import of {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (str, bytes)) and realpath(fsdecode(path)).startswith("/proc"):
                raise PermissionError("sandbox: /proc is not readable")
            wants_write = (
                any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
            )
            if wants_write and not inside(path):
                raise PermissionError("sandbox: writing outside the working directory is not allowed")
        if event in WRITE_EVENTS:
            for path in args:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError(
                        "sandbox: changing files outside the working directory is not allowed"
                    )

    return hook


if __name__ == "__main__":
    main(sys.argv[1:])
