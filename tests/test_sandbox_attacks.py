"""Attacks on the sandbox, run through both backends, by a scorer that is root and one that is not.

Each attack is a program scored by a real scorer process (`_drive`, the same `run_many` that
`ds-eval score` uses); afterwards the test checks on the host that the attack's effect did not
happen (a file created, overwritten, renamed or removed, a secret read, the scorer killed, a
forged pass, something left behind). Where a program can tell that its attack worked, its `f` is
right only then, so a pass would mean a broken sandbox. As root the scorer runs directly; as an
ordinary user it runs as `nobody` (setpriv), in a mount namespace where only /root is made
traversable so that nobody can start this interpreter.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ds_train.errors import UsageError
from eval import sandbox

pytestmark = pytest.mark.slow  # every test here runs sandboxed programs as root and as nobody

SECRET = "ds-eval-attack-secret-9d2e"
REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
GOOD_TEST = "assert f(2) == 4\n"
RIGHT_IF_OK = "def f(x):\n    return 4 if ok else 0\n"
WRONG = "def f(x):\n    return 0\n"
PROC_SCAN = (
    "import os\nroot = os.open('/', os.O_RDONLY)\nfound = ''\n"
    "for pid in os.listdir('/proc'):\n"
    "    if pid.isdigit():\n"
    "        for name in ('environ', 'cmdline'):\n"
    "            try:\n"
    "                fd = os.open('proc/%s/%s' % (pid, name), os.O_RDONLY, dir_fd=root)\n"
    "                found += os.read(fd, 1 << 16).decode('latin-1')\n"
    "            except OSError as e:\n"
    "                print(e)\n"
)


def _cases(tag: str, victim: Path, home: Path, tmp: Path, sockets=()) -> dict[str, tuple[str, str, str]]:
    """name -> (program, test, check). `tag` marks every name an attack tries to create."""
    v = f"v = os.open({str(victim)!r}, os.O_RDONLY)\n"
    t = "t = os.open('/tmp', os.O_RDONLY)\n"

    def attempt(*lines: str) -> str:  # each line tried on its own, errors printed
        return "".join(f"try:\n    {line}\nexcept Exception as e:\n    print(repr(e))\n" for line in lines)

    return {
        "dir_fd_create_in_temp_dirs": (
            "import os\n"
            + attempt(
                *(
                    f"os.close(os.open('pwned_{tag}', os.O_WRONLY | os.O_CREAT, "
                    f"dir_fd=os.open({d!r}, os.O_RDONLY)))"
                    for d in ("/tmp", "/var/tmp", "/dev/shm")
                )
            )
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "dir_fd_overwrite_and_create": (
            "import os\n"
            + v
            + attempt(
                "fd = os.open('keep.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=v); os.write(fd, b'pwned')",
                f"os.close(os.open('new_{tag}', os.O_WRONLY | os.O_CREAT, dir_fd=v))",
                "os.chmod('keep.txt', 0o777, dir_fd=v)",
            )
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "dir_fd_rename": (
            "import os\n"
            + v
            + attempt("os.rename('keep2.txt', 'moved', src_dir_fd=v, dst_dir_fd=v)")
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "dir_fd_remove": (
            "import os\n" + v + attempt("os.remove('keep3.txt', dir_fd=v)") + WRONG,
            GOOD_TEST,
            "",
        ),
        "dir_fd_symlink_to_passwd": (
            "import os\n" + t + attempt(f"os.symlink('/etc/passwd', 'link_{tag}', dir_fd=t)") + WRONG,
            GOOD_TEST,
            "",
        ),
        "sqlite_in_tmp": (
            "import sqlite3\n"
            + attempt(f"c = sqlite3.connect('/tmp/sq_{tag}.db'); c.execute('create table t(x)'); c.commit()")
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "posix_shm": (
            "import _posixshmem, os\n"
            + attempt(
                f"fd = _posixshmem.shm_open('/shm_{tag}', os.O_CREAT | os.O_RDWR, 0o600); "
                "os.write(fd, b'x' * (1 << 20))"
            )
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "readline_history": (
            "import readline\n" + attempt(f"readline.write_history_file('/tmp/hist_{tag}')") + WRONG,
            GOOD_TEST,
            "",
        ),
        "dbm_file": (  # dbm.ndbm where the interpreter has it, else whatever dbm offers
            "import dbm\ntry:\n    import dbm.ndbm as d\nexcept ImportError:\n    d = dbm\n"
            + attempt(f"db = d.open('/tmp/dbm_{tag}', 'c'); db[b'k'] = b'v'; db.close()")
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "leftovers_everywhere": (
            "import os, sqlite3\nblob = b'x' * (4 << 20)\n"
            + attempt(
                *(
                    f"fd = os.open('big_{tag}', os.O_WRONLY | os.O_CREAT, dir_fd=os.open({d!r}, os.O_RDONLY)); "
                    "os.write(fd, blob)"
                    for d in ("/tmp", "/var/tmp", "/dev/shm")
                ),
                "os.mkdir('locked'); open('locked/f', 'w').write('x'); os.chmod('locked', 0)",
                "os.mkdir('deep'); os.chmod('deep', 0o500)",
            )
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "fill_the_disk": (  # right only if 320 MiB fit: its workdir and temp dirs hold 4 x 64 MiB
            "import os\nwritten = 0\n"
            "for d in ('.', '/tmp', '/var/tmp', '/dev/shm'):\n"
            "    try:\n"
            "        for i in range(40):\n"
            "            fd = os.open(f'fill{i}', os.O_WRONLY | os.O_CREAT, dir_fd=os.open(d, os.O_RDONLY))\n"
            "            written += os.write(fd, b'x' * (8 << 20))\n"
            "            os.close(fd)\n"
            "    except OSError as e:\n"
            "        print(e)\n"
            "ok = written >= 320 << 20\n" + RIGHT_IF_OK,
            GOOD_TEST,
            "",
        ),
        "proc_environ_of_scorer": (
            PROC_SCAN
            + "ok = 'ds-eval-attack-secret' in found\nif ok:\n    raise SystemExit(found)\n"
            + RIGHT_IF_OK,
            GOOD_TEST,
            "",
        ),
        "see_the_scorer_process": (PROC_SCAN + "ok = '_drive' in found\n" + RIGHT_IF_OK, GOOD_TEST, ""),
        "neighbour_workdir": (
            "import os\nok = False\n"
            + attempt(
                f"ok = 'ds-eval-attack-secret' in open({str(tmp / 'ds-eval-neighbour' / 'secret.txt')!r}).read()",
                "ok = ok or any(n.startswith('ds-eval-neighbour') for n in os.listdir('/tmp'))",
            )
            + RIGHT_IF_OK,
            GOOD_TEST,
            "",
        ),
        "home_token": (
            "import os\nok = False\n"
            + attempt(
                f"ok = 'ds-eval-attack-secret' in os.read(os.open('token', os.O_RDONLY, "
                f"dir_fd=os.open({str(home)!r}, os.O_RDONLY)), 999).decode()",
                f"os.close(os.open('pwned_{tag}', os.O_WRONLY | os.O_CREAT, dir_fd=os.open({str(home)!r}, 0)))",
            )
            + RIGHT_IF_OK,
            GOOD_TEST,
            "",
        ),
        "pidfd_kill_scorer": (
            "import os, signal\n"
            + attempt("signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)")
            + "for pid in os.listdir('/proc'):\n"
            "    if pid.isdigit() and int(pid) != os.getpid():\n"
            + "".join(
                "        " + line + "\n"
                for line in attempt(
                    "signal.pidfd_send_signal(os.pidfd_open(int(pid)), signal.SIGKILL)"
                ).splitlines()
            )
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "forge_nonce_from_proc_self_mem": (
            "import os, re\nroot = os.open('/', os.O_RDONLY)\ntokens = set()\n"
            + attempt(
                "maps = os.read(os.open('proc/self/maps', os.O_RDONLY, dir_fd=root), 1 << 20).decode()\n"
                "    mem = os.open('proc/self/mem', os.O_RDONLY, dir_fd=root)\n"
                "    for line in maps.splitlines():\n"
                "        if 'rw' in line.split()[1]:\n"
                "            lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
                "            try:\n"
                "                tokens.update(re.findall(rb'(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])', "
                "os.pread(mem, hi - lo, lo)))\n"
                "            except OSError:\n"
                "                pass"
            )
            + "print(len(tokens), 'candidates')\n"
            "for token in tokens:\n"
            "    os.write(3, token)\n"
            "os._exit(0)\n",
            GOOD_TEST,
            "",
        ),
        "hardlink_victim": (
            "import os\n"
            + attempt(
                f"os.link({str(victim / 'keep.txt')!r}, 'hl'); fd = os.open('hl', os.O_WRONLY); os.write(fd, b'pwned')"
            )
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "symlink_out_of_workdir": (
            "import os\n"
            + attempt(
                f"os.symlink({str(victim / 'keep.txt')!r}, 'ln'); "
                "fd = os.open('ln', os.O_WRONLY | os.O_TRUNC, dir_fd=os.open('.', os.O_RDONLY)); os.write(fd, b'pwned')"
            )
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "unix_sockets_of_the_scorer's_user": (  # like an agent's socket; one in /run, one beside the victims
            "import _socket\n"
            + attempt(
                *(
                    f"s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM); s.connect({str(p)!r}); s.send(b'x')"
                    for p in sockets
                )
            )
            + WRONG,
            GOOD_TEST,
            "",
        ),
        "good": ("def f(x):\n    return 2 * x\n", GOOD_TEST, ""),
    }


def _drive(cases_path: str, out_path: str) -> None:
    """The scorer: run the cases through `run_many` and write what came back (or the refusal)."""
    cases = json.loads(Path(cases_path).read_text())
    try:
        mech = sandbox.mechanism()
    except UsageError as err:
        Path(out_path).write_text(json.dumps({"refused": str(err)}))
        return
    names = list(cases)
    outcomes = sandbox.run_many([cases[n] for n in names], sandbox.Limits(timeout=3), workers=2)
    result = {
        n: {"passed": o.passed, "result": o.result, "out": o.stdout + o.stderr}
        for n, o in zip(names, outcomes)
    }
    Path(out_path).write_text(json.dumps({"sandbox": mech.describe(), "outcomes": result}))


# As nobody: a mount namespace in which /root is an empty tmpfs with the interpreter bound back
# ($1: where to keep /root meanwhile, $2: the interpreter's prefix).
AS_NOBODY = (
    'set -e; {mount} --rbind /root "$1"; {mount} -t tmpfs -o mode=755 tmpfs /root; '
    'case "$2" in /root/*) {mkdir} -p "$2"; {mount} --rbind "$1${{2#/root}}" "$2";; esac; '
    "exec {setpriv} --reuid={uid} --regid={uid} --clear-groups --inh-caps=-all {driver}"
)


def _scorer_command(user: str, base: Path, out_path: Path, cases_path: Path) -> list[str]:
    driver = [
        sys.executable, "-c", "import sys; from tests.test_sandbox_attacks import _drive; _drive(*sys.argv[1:])",
        str(cases_path), str(out_path),
    ]  # fmt: skip
    if user == "self":
        return driver
    tools = {name: shutil.which(name) for name in ("mount", "mkdir", "setpriv", "unshare", "sh")}
    stash = base / "root"
    stash.mkdir()
    script = AS_NOBODY.format(**tools, uid=NOBODY, driver=" ".join(f"'{a}'" for a in driver))
    prefix = os.path.realpath(sys.base_prefix)
    return [
        tools["unshare"],
        "-m",
        "--propagation",
        "private",
        tools["sh"],
        "-c",
        script,
        "sh",
        str(stash),
        prefix,
    ]


# Inside a user namespace (uid 1000 = nobody outside) whose root forbade further user namespaces:
# what a scorer meets on a kernel that refuses unprivileged user namespaces.
WITHOUT_USERNS = "echo 0 > /proc/sys/user/max_user_namespaces; " + AS_NOBODY.replace("{uid}", "1000")


def _run_without_user_namespaces(base: Path, out_path: Path, cases_path: Path, env: dict):
    driver = [
        sys.executable, "-c", "import sys; from tests.test_sandbox_attacks import _drive; _drive(*sys.argv[1:])",
        str(cases_path), str(out_path),
    ]  # fmt: skip
    tools = {name: shutil.which(name) for name in ("mount", "mkdir", "setpriv", "unshare", "sh")}
    stash = base / "root"
    stash.mkdir()
    inner = (
        base / "inner.sh"
    )  # run once the maps are written: exec'ed as uid 0 it has the namespace's capabilities
    inner.write_text(WITHOUT_USERNS.format(**tools, driver=" ".join(f"'{a}'" for a in driver)))
    script = f'read go; exec {tools["sh"]} {inner} "$1" "$2"'
    prefix = os.path.realpath(sys.base_prefix)
    command = [tools["unshare"], "--user", "--mount", "--propagation", "private", tools["sh"], "-c", script]
    proc = subprocess.Popen(
        [*command, "sh", str(stash), prefix],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    own = os.readlink("/proc/self/ns/user")
    while os.readlink(f"/proc/{proc.pid}/ns/user") == own:  # until unshare made the namespace
        pass
    for name in ("uid_map", "gid_map"):  # written from outside by root: two ranges are allowed
        Path(f"/proc/{proc.pid}/{name}").write_text(f"0 0 1\n1000 {NOBODY} 1\n")
    out, err = proc.communicate("go\n", timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _users() -> list[str]:
    return ["self", "nobody"] if os.geteuid() == 0 else ["self"]


def _visible_base() -> Path:
    """Somewhere outside every directory the sandbox hides, so the victims are visible inside."""
    for candidate in ("/srv", "/opt", "/var/lib"):
        if os.access(candidate, os.W_OK):
            return Path(tempfile.mkdtemp(prefix="ds-eval-attack-", dir=candidate))
    return Path(tempfile.mkdtemp(prefix="ds-eval-attack-", dir=REPO))


def _scoring_run(backend: str, user: str, extra_env: dict | None = None, cases: dict | None = None) -> dict:
    """Run the scorer once; returns the host's view afterwards."""
    base = _visible_base()
    uid = NOBODY if user.startswith("nobody") else os.geteuid()
    victim, home, tmp = base / "victim", base / "home", base / "tmp"
    tag = f"{backend}{user}{os.getpid()}"
    for d in (victim, home, tmp, tmp / "ds-eval-neighbour"):
        d.mkdir()
    for name in ("keep.txt", "keep2.txt", "keep3.txt"):
        (victim / name).write_text("precious")
    (home / "token").write_text(SECRET)
    (tmp / "ds-eval-neighbour" / "secret.txt").write_text(SECRET)
    os.chmod(base, 0o755)
    for path in [base, *base.rglob("*")]:
        os.chown(path, uid, uid)
    os.chmod(home / "token", 0o600)
    listeners = _listen([base / "agent.sock", Path(f"/run/ds-eval-attack-{tag}.sock")], uid)
    cases = cases if cases is not None else _cases(tag, victim, home, tmp, [p for p, _ in listeners])
    cases_path, out_path = base / "cases.json", base / "out.json"
    cases_path.write_text(json.dumps(cases))
    os.chown(cases_path, uid, uid)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "DS_EVAL_SANDBOX": backend,
        "DS_EVAL_SECRET": SECRET,
        "PYTHONPATH": str(REPO),
        **(extra_env or {}),
    }
    if user == "nobody-without-userns":
        proc = _run_without_user_namespaces(base, out_path, cases_path, env)
    else:
        proc = subprocess.run(
            _scorer_command(user, base, out_path, cases_path),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    host = {
        "rc": proc.returncode,
        "stderr": proc.stderr,
        "report": json.loads(out_path.read_text()) if out_path.exists() else {},
        "tag": tag,
        "victim": {p.name: (p.read_text(), p.stat().st_mode & 0o777) for p in victim.iterdir()},
        "tmp_left": sorted(p.name for p in tmp.iterdir()),
        "home_left": sorted(p.name for p in home.iterdir()),
        "host_tag_files": sorted(  # what attacks created in the host's temp dirs
            p.name
            for d in ("/tmp", "/var/tmp", "/dev/shm")
            if os.path.isdir(d)
            for p in Path(d).glob(f"*{tag}*")
        ),
    }
    host["processes_left"] = _processes_under(base)
    host["unix_connected"] = _connected(listeners)
    shutil.rmtree(base)
    return host


def _listen(paths: list[Path], uid: int) -> list[tuple[Path, socket.socket]]:
    """Unix sockets the scorer's user owns and may connect to (0777), listening."""
    listeners = []
    for path in paths:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chown(path, uid, uid)
        os.chmod(path, 0o777)
        listener.listen(4)
        listener.settimeout(0.1)
        listeners.append((path, listener))
    return listeners


def _connected(listeners: list[tuple[Path, socket.socket]]) -> list[str]:
    """The sockets someone connected to; closes and removes them all."""
    reached = []
    for path, listener in listeners:
        try:
            listener.accept()[0].close()
            reached.append(str(path))
        except TimeoutError:
            pass
        listener.close()
        path.unlink()
    return reached


def _processes_under(base: Path) -> list[int]:
    """Processes whose working directory is under `base` (every program's workdir is)."""
    left = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "cwd").startswith(str(base)):
                left.append(int(entry.name))
        except OSError:
            pass
    return left


RUNS = [(backend, user) for backend in sandbox.BACKENDS for user in _users()]
CASES = list(_cases("x", Path("/v"), Path("/h"), Path("/t")))


@pytest.fixture(scope="module", params=RUNS, ids=[f"{b}-{u}" for b, u in RUNS])
def attacked(request):
    return _scoring_run(*request.param)


def _created(prefix):
    return lambda host: not [n for n in host["host_tag_files"] + list(host["victim"]) if n.startswith(prefix)]


PRECIOUS = ("precious", 0o644)
EFFECT_ABSENT = {  # case -> host check that is true when the attack had no effect on the host
    "dir_fd_create_in_temp_dirs": _created("pwned_"),
    "dir_fd_overwrite_and_create": lambda h: h["victim"]["keep.txt"] == PRECIOUS and _created("new_")(h),
    "dir_fd_rename": lambda h: h["victim"].get("keep2.txt") == PRECIOUS and "moved" not in h["victim"],
    "dir_fd_remove": lambda h: h["victim"].get("keep3.txt") == PRECIOUS,
    "dir_fd_symlink_to_passwd": _created("link_"),
    "sqlite_in_tmp": _created("sq_"),
    "posix_shm": _created("shm_"),
    "readline_history": _created("hist_"),
    "dbm_file": _created("dbm_"),
    "leftovers_everywhere": _created("big_"),
    "home_token": lambda h: h["home_left"] == ["token"],
    "unix_sockets_of_the_scorer's_user": lambda h: h["unix_connected"] == [],
    "pidfd_kill_scorer": lambda h: h["rc"] == 0 and h["report"]["outcomes"]["good"]["passed"],
    "hardlink_victim": lambda h: h["victim"]["keep.txt"] == PRECIOUS,
    "symlink_out_of_workdir": lambda h: h["victim"]["keep.txt"] == PRECIOUS,
}


@pytest.mark.parametrize("name", CASES)
def test_attack_is_contained(attacked, name):
    assert attacked["rc"] == 0, attacked["stderr"]
    outcome = attacked["report"]["outcomes"][name]
    assert outcome["passed"] == (name == "good"), (name, outcome)
    assert SECRET not in outcome["out"] + outcome["result"]
    if name in EFFECT_ABSENT:
        assert EFFECT_ABSENT[name](attacked), (name, attacked)
    if name == "forge_nonce_from_proc_self_mem":
        assert outcome["result"] == "failed: the program exited before its tests finished"


def test_scorer_survives_and_cleans_up(attacked):
    assert attacked["rc"] == 0, attacked["stderr"]
    assert attacked["tmp_left"] == ["ds-eval-neighbour"]  # every workdir removed, whatever its modes
    assert attacked["processes_left"] == []  # nothing of any program survives its run


def test_report_says_how_programs_were_isolated(attacked):
    described = attacked["report"]["sandbox"]
    assert ("bubblewrap" in described) or ("unshare" in described)
    if "private uid" not in described:
        assert f"unprivileged user namespace (uid {sandbox.INNER_UID})" in described


REFUSALS = [(user, {"PATH": "/nonexistent"}) for user in _users()]  # no bwrap, no unshare
if os.geteuid() == 0:  # both installed, but the kernel refuses user namespaces to the scorer
    REFUSALS.append(("nobody-without-userns", {}))


@pytest.mark.parametrize(("user", "env"), REFUSALS, ids=[f"{u}-{bool(e)}" for u, e in REFUSALS])
def test_without_isolation_a_one_line_refusal_unless_unsafe_is_asked_for(user, env):
    """No tool, or no user namespaces: the scorer refuses, saying why and how; the opt-out runs."""
    writes_home = {"p": ("import os\nprint(sorted(os.environ))\n" + WRONG, GOOD_TEST, "")}
    refused = _scoring_run("", user, env, writes_home)["report"]
    assert "\n" not in refused["refused"]
    assert "cannot isolate generated programs" in refused["refused"]
    assert "--unsafe-no-isolation" in refused["refused"] and "user namespaces" in refused["refused"]
    unsafe = _scoring_run("", user, {**env, sandbox.UNSAFE_ENV: "1"}, writes_home)["report"]
    assert unsafe["sandbox"].startswith("NO ISOLATION")
    assert unsafe["outcomes"]["p"]["result"] == "failed: AssertionError"
