#!/usr/bin/env bash
# The GPU measurement in three parts of at most ~4 minutes each on one H200; each part is useful alone and
# writes one JSON of tools/benchmark.py (partN.json) and its log (partN.log) into the results folder it is given.
#
#   PART=1  GPU tests (pytest -m gpu); machine ceilings (bf16 matmul TFLOP/s, device copy GB/s); ResNet-50 with BN
#           and with AN in each implementation (reference, fused, compile; the compile one under torch.compile),
#           training and inference, batch 256, bf16, channels_last, one fixed synthetic batch.
#   PART=2  the paper's other rows at their per-GPU batch, training: ResNet-101 128, MobileNetV2 128, DenseNet-121
#           256, AOGNet-12M 256, AOGNet-40M 128 (BN and AN), ResNet-50 GN, SN and SE 256. AN uses AN_IMPL (default:
#           the fastest AN training row of part1.json in the results folder when it is there, else fused).
#   PART=3  DALI: unpacks it from the DALI parts (.gpu/d-00, d-01, d-02) when it is not importable, writes
#           ImageNet-sized JPEGs, then ResNet-50 AN training fed by nothing (fixed batch), by dali and by the torch
#           backend with 16 workers (each row also times the loader alone), and the dali evaluation pipeline alone
#           (part3_loader.jsonl, tools/bench_loader.py).
#
# Usage (repository root):
#   PART=1 bash scripts/gpu_benchmark.sh RESULTS_DIR       # on the GPU machine, e.g. RESULTS_DIR=$OUT
#   DEVICE=cpu QUICK=1 PART=3 bash scripts/gpu_benchmark.sh /tmp/res   # tiny sizes on the CPU: checks the flow
#
# Environment: PART (1, 2 or 3; required), DEVICE (cuda | cpu), QUICK (1 = tiny sizes), AN_IMPL (part 2),
# DALI_PARTS (folder of the DALI parts, default .gpu), SITE (where they unpack, default /tmp/site), JPEGS (JPEG
# folder, default /tmp/gpu_bench_jpegs), THREADS (torch threads, CPU runs), PYTHON.
# The DALI parts are a site-packages tree (DALI and the nvJPEG library it needs), as a tar archive compressed with
# xz and split in three; they unpack with `cat d-* | xz -dc | tar -x` into SITE, which goes first on PYTHONPATH.
# Each step runs under `timeout`; tools/benchmark.py rewrites its JSON after every row, so a step cut short keeps
# its finished rows, and a failing step does not stop the next one.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PART=${PART:-}
RESULTS=${1:-${RESULTS:-}}
if [[ ! $PART =~ ^[123]$ || -z $RESULTS ]]; then
  echo "usage: PART=1|2|3 bash scripts/gpu_benchmark.sh RESULTS_DIR  (see the header of this script)" >&2
  exit 2
fi
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PY=${PYTHON:-python3}
DALI_PARTS=${DALI_PARTS:-.gpu}
SITE=${SITE:-/tmp/site}
JPEGS=${JPEGS:-/tmp/gpu_bench_jpegs}
mkdir -p "$RESULTS"
LOG="$RESULTS/part$PART.log"
JSON="$RESULTS/part$PART.json"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}

if [[ $QUICK == 1 ]]; then
  IMG=32 B=2 B_SMALL=2 B_LARGE=2 WARM=1 STEPS=2 REPS=2 WORKERS=2 UNIQUE=8 NFILES=32
  CEIL=(--ceiling-size 256 --ceiling-copy-mib 32)
  TESTS=(tests/test_accel.py)
  # CPU code generation is slow: a small model, compiled by dynamo without code generation, checks the flow.
  RN50=resnet18 RN50_KW=(--model-kwargs base_width=8) COMPILE_KW=(--compile-backend eager)
  PAPER=("mobilenetv2:bn:$B_SMALL" "mobilenetv2:an:$B_SMALL" "resnet50:gn:$B")
else
  IMG=224 B=256 B_SMALL=128 B_LARGE=256 WARM=5 STEPS=15 REPS=3 WORKERS=16 UNIQUE=512 NFILES=16384
  CEIL=()
  TESTS=(tests/)
  RN50=resnet50 RN50_KW=() COMPILE_KW=()
  PAPER=("resnet101:bn:$B_SMALL" "resnet101:an:$B_SMALL" "mobilenetv2:bn:$B_SMALL" "mobilenetv2:an:$B_SMALL"
    "densenet121:bn:$B_LARGE" "densenet121:an:$B_LARGE" "aognet12m:bn:$B_LARGE" "aognet12m:an:$B_LARGE"
    "aognet40m:bn:$B_SMALL" "aognet40m:an:$B_SMALL" "resnet50:gn:$B" "resnet50:sn:$B" "resnet50:se:$B")
fi
COMMON=(--device "$DEVICE" --img-size "$IMG" --precision bf16 --channels-last --warmup "$WARM" --steps "$STEPS"
  --repeats "$REPS" ${THREADS:+--threads "$THREADS"})

# step NAME SECONDS COMMAND...: runs COMMAND (a program or an exported function of this script) under a timeout;
# reports its exit status; never fails.
step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (timeout ${limit}s) ==="
  timeout -k 10 "$limit" bash -c '"$@"' bash "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s$( ((rc == 124 || rc == 137)) && echo ' (timed out)') ==="
}

# The fastest AN implementation for training in part1.json (fused when there is none).
best_an_impl() {
  $PY - "$RESULTS/part1.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError, KeyError):
    rows = []
rows = [r for r in rows if r.get("norm") == "an" and r.get("mode") == "train" and not r.get("error")]
print(max(rows, key=lambda r: r["images_per_sec"])["an_impl"] if rows else "fused")
PY
}

setup_dali() {
  if $PY -c "import nvidia.dali" 2>/dev/null; then
    echo "DALI $($PY -c 'import nvidia.dali as d; print(d.__version__)') is importable"
    return 0
  fi
  local parts=("$DALI_PARTS"/d-0[0-2])
  if [[ ${#parts[@]} -ne 3 || ! -f ${parts[0]} || ! -f ${parts[2]} ]]; then
    echo "DALI is not importable and the three DALI parts are not all in $DALI_PARTS (found: ${parts[*]})"
    return 1
  fi
  mkdir -p "$SITE" && cat "${parts[@]}" | xz -dc | tar -x -C "$SITE" || return 1
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  echo "DALI unpacked into $SITE: $($PY -c 'import nvidia.dali as d; print(d.__version__)')"
}

# ImageNet-sized JPEGs (500x375, ~90 KB): UNIQUE written in parallel, hard-linked up to NFILES training files
# in 8 classes; val/ holds the UNIQUE files.
make_jpegs() {
  $PY - "$JPEGS" "$UNIQUE" "$NFILES" <<'PY'
import os, sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from tools.bench_loader import natural_image

root, unique, total = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
src = root / "src"


def write(i):
    path = src / f"img_{i:06d}.JPEG"
    if not path.exists():
        natural_image(np.random.default_rng(i)).save(path, quality=90)


src.mkdir(parents=True, exist_ok=True)
with Pool(min(16, os.cpu_count() or 1)) as pool:
    pool.map(write, range(unique))
for split, count in (("train", total), ("val", unique)):
    for i in range(count):
        d = root / split / f"n{i % 8:08d}"
        d.mkdir(parents=True, exist_ok=True)
        dst = d / f"img_{i:06d}.JPEG"
        if not dst.exists():
            os.link(src / f"img_{i % unique:06d}.JPEG", dst)
print(f"{total} training and {unique} validation JPEGs ({unique} distinct) in {root}")
PY
}

part1() {
  step "gpu tests" 75 $PY -m pytest -q -m gpu -p no:cacheprovider "${TESTS[@]}"
  step "resnet50" 165 $PY tools/benchmark.py "${COMMON[@]}" --ceilings "${CEIL[@]}" --mode both --compile auto \
    --rows "$RN50:bn:$B" "$RN50:an:$B" --an-impl fused reference compile "${RN50_KW[@]}" "${COMPILE_KW[@]}" \
    --json "$JSON"
}

part2() {
  local impl=${AN_IMPL:-$(best_an_impl)}
  echo "AN implementation: $impl"
  step "paper rows" 225 $PY tools/benchmark.py "${COMMON[@]}" --mode train --compile auto --an-impl "$impl" \
    --rows "${PAPER[@]}" "${COMPILE_KW[@]}" --json "$JSON"
}

part3() {
  local dali=dali
  [[ $DEVICE == cpu ]] && dali=dali_cpu
  if ! setup_dali; then
    dali=""
  fi
  step "jpegs" 45 make_jpegs
  [[ -n $dali ]] && step "$dali evaluation pipeline alone" 40 loader_alone "$dali" val
  # shellcheck disable=SC2086
  step "resnet50 an fed by data" 150 $PY tools/benchmark.py "${COMMON[@]}" --mode train --rows "resnet50:an:$B" \
    --an-impl "${AN_IMPL:-fused}" --backend none $dali torch --data-root "$JPEGS" --workers "$WORKERS" --json "$JSON"
}

loader_alone() {  # loader_alone BACKEND SPLIT: tools/bench_loader.py; its JSON line goes to part3_loader.jsonl
  local out
  out=$($PY tools/bench_loader.py --data-root "$JPEGS" --backend "$1" --split "$2" --device "$DEVICE" \
    --batch-size "$B" --steps $((STEPS * 2)) --warmup "$WARM" --workers "$WORKERS" --img-size "$IMG" --channels-last)
  local rc=$?
  echo "$out"
  [[ $rc == 0 ]] && tail -n 1 <<<"$out" >>"$RESULTS/part3_loader.jsonl"
  return "$rc"
}

export -f make_jpegs loader_alone
export PY JPEGS UNIQUE NFILES RESULTS DEVICE B STEPS WARM WORKERS IMG
{
  echo "gpu_benchmark part $PART: DEVICE=$DEVICE QUICK=$QUICK RESULTS=$RESULTS"
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs, $($PY --version 2>&1)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  t0=$SECONDS
  "part$PART"
  echo "part $PART: $((SECONDS - t0))s in all"
} 2>&1 | tee "$LOG"
