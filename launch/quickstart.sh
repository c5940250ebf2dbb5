#!/usr/bin/env bash
# The main job on the embedded default: sets up ./.venv on a fresh machine, then runs ds-train with
# no recipe: mine a corpus from this machine's Python sources, train a tokenizer, train a tiny
# GPT-Neo (Code CLM + partial separation, DeepSpeed ZeRO-2; CPU when there is no GPU), checkpoint,
# export fp16, and print a summary. Extra arguments go to ds-train, e.g. --train.max_steps=50.
# Knobs: RUN_DIR (default runs/default). Re-running reuses the corpus, tokenizer and checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/bootstrap.sh
export TOKENIZERS_PARALLELISM=false
# 2% of the mined pairs held out: their loss is `val/loss`, every 100 steps and after the last one
exec .venv/bin/ds-train --run.dir="${RUN_DIR:-runs/default}" --data.val_share=0.02 --eval.every_steps=100 "$@"
