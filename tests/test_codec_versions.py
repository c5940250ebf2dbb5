"""The codec's round-trip property on the other Python versions the project runs on.

The GPU machines run Python 3.12, whose tokenizer splits f-strings into pieces (PEP 701). The codec is
standard-library only, so its file runs as is under each interpreter over a sample of that
interpreter's own standard library: `ast.dump(ast.parse(delinearize(linearize(src))))` must equal
`ast.dump(ast.parse(src))` for every file that the interpreter itself parses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the round trip under other interpreters

CODEC_DIR = Path(__file__).resolve().parents[1] / "ds_train" / "data"

SWEEP = r"""
import ast, json, pathlib, sys, sysconfig
sys.path.insert(0, sys.argv[1])
import codec
root = pathlib.Path(sysconfig.get_paths()["stdlib"])
files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)[:: int(sys.argv[2])]
checked, bad = 0, []
for path in files:
    try:
        src = path.read_text(encoding="utf-8")
        want = ast.dump(ast.parse(src))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
    checked += 1
    try:
        if ast.dump(ast.parse(codec.delinearize(codec.linearize(src)))) != want:
            bad.append(str(path))
    except Exception as err:  # noqa: BLE001 - report every failure
        bad.append(f"{path}: {type(err).__name__}: {err}")
fstrings = 'x = f"{a!r:>{w}} {f"{b}"} {{c}}"\ny = rf"\\d{n}" f"{d:{e}}"\n'
same = ast.dump(ast.parse(codec.delinearize(codec.linearize(fstrings)))) == ast.dump(ast.parse(fstrings))
print(json.dumps({"version": sys.version.split()[0], "checked": checked, "bad": bad[:5], "n_bad": len(bad),
                  "fstrings": same}))
"""


def interpreter(version: str) -> str:
    """python3.X from PATH or from pyenv (this machine kind ships 3.10 to 3.13 under ~/.pyenv)."""
    for candidate in sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}")):
        return str(candidate)
    found = shutil.which(f"python{version}")
    if found and "/shims/" not in found:  # a pyenv shim only works for the selected version
        return found
    raise AssertionError(f"python{version} is not on this machine: the codec cannot be checked on it")


@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_round_trip_on_other_interpreters(version):
    proc = subprocess.run([interpreter(version), "-I", "-c", SWEEP, str(CODEC_DIR), "7"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"].startswith(version)
    assert result["checked"] > 150
    assert result["n_bad"] == 0, result["bad"]
    assert result["fstrings"]
