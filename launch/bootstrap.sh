#!/usr/bin/env bash
# Creates ./.venv (once) and installs ds_train with its test extras into it.
# Knobs: PYTHON (interpreter to build the venv from, default python3), VENV (default .venv).
# Re-running is cheap: it reinstalls only when setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
# The ds-eval sandbox prefers bubblewrap: as root with apt, install it quietly when missing. A failure
# is not fatal: the sandbox then uses util-linux unshare, or refuses to run generated code.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; }; } >/dev/null 2>&1 \
    || echo "bootstrap: could not install bubblewrap; the ds-eval sandbox will use unshare" >&2
fi
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.ds_train_installed"
want=$(sha256sum setup.py | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "bootstrap: $PYTHON is older than Python 3.10; set PYTHON=/path/to/python3.10+" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
echo "bootstrap: installing into $VENV (first time only, about a minute)" >&2
"${pip[@]}" --upgrade pip
# torch is pinned first so that a CPU machine takes the local CPU build, not a CUDA one.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e ".[test,cpu]"
echo "$want" > "$stamp"
