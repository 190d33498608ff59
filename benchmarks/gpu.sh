#!/usr/bin/env bash
# The checks a GPU session runs, in one go (about 8 minutes on one H100/H200):
#
#   bash benchmarks/gpu.sh            # results and a log in $OUT (default benchmarks/results)
#
# 1. pip install -e '.[test,demo]', and jax[cuda12] (jax's own version) only when jax has no
#    GPU backend; nothing else is installed.
# 2. benchmarks/transformer.py on GPT-2 small (86M parameters, 256 byte tokens) at 4 x 1024
#    tokens in float32 (LA(10), SA(3), BE(6), SLQ) and in bfloat16 (LA(10), SA(3)): the goals
#    of issue 12 (LA(10) and SA(3) within 300 products and 3 minutes including compilation, an
#    HVP at most 2.5 gradients) against the measured numbers; and float32 over one raveled
#    parameter vector (--flat), for the compile time.
# 3. benchmarks/hvp.py and benchmarks/scale.py --quick.
#
# Every step has a time limit; a step that fails or runs out of time is recorded and the next
# one runs (the transformer benchmark saves its tables after every part, so a cut run keeps
# what it measured). The exit status is nonzero when any step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
# The working tree's hesskit, installed or not (an offline machine may refuse the install).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu-session.log"
if [ -x .venv/bin/python ]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
failed=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2 rc=0 t0=$SECONDS
  shift 2
  echo "== $name (limit ${secs} s): $*" | tee -a "$LOG"
  timeout --kill-after=15 "$secs" "$@" >>"$LOG" 2>&1 || rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then failed+=("$name (exit $rc)"); fi
}

has_gpu() { "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; }

step install 150 "$PY" -m pip install -q -e '.[test,demo]'
if ! has_gpu; then
  version=$("$PY" -c 'import jax; print(jax.__version__)')
  step install-cuda 240 "$PY" -m pip install -q "jax[cuda12]==$version"
fi
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee -a "$LOG"
if ! has_gpu; then
  echo "jax has no GPU backend here; stopping (see $LOG)" | tee -a "$LOG"
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG" || true

gpt2=(benchmarks/transformer.py --config gpt2-small --batch 4 --context 1024 --out "$OUT")
short=(--steps 20 --problems 'LA(10),SA(3)' --slq-runs 0 --repeats 5)
step transformer-float32 210 "$PY" "${gpt2[@]}" --steps 50
step transformer-bf16 100 "$PY" "${gpt2[@]}" --bf16 "${short[@]}"
# The solvers' compiled program grows with the number of parameter arrays (149 here): the
# same solves over one raveled vector show what that costs in compile time.
step transformer-flat 100 "$PY" "${gpt2[@]}" --flat "${short[@]}"
step hvp 30 "$PY" benchmarks/hvp.py --out "$OUT"
step scale-quick 45 "$PY" benchmarks/scale.py --quick --out "$OUT"

ls -l "$OUT" | tee -a "$LOG"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed: ${failed[*]}" | tee -a "$LOG"
  exit 1
fi
echo "all steps passed" | tee -a "$LOG"
