#!/usr/bin/env bash
# Every throughput figure of the performance issue in ONE call of the GPU machine (about 9 minutes):
#
#   1. rn50     machine ceilings (bf16 matmul TFLOP/s, copy GB/s); ResNet-50 BN and AN (an_impl reference and
#               fused) at batch 256, bf16, channels_last, fixed synthetic batch, train and infer, eager
#   2. data     tools/bench_loader.py (dali if importable, and torch) on generated ImageNet-sized JPEGs, then
#               ResNet-50 BN/AN training fed by the dali backend (compare with the fixed-batch rows of 1)
#   3. paper    training at the paper's per-GPU batches, BN and AN: ResNet-101 128, MobileNetV2 128,
#               DenseNet-121 256, AOGNet-12M 256, AOGNet-40M 128; ResNet-50 GN, SN and SE at 256
#   4. compile  the rows of 1 again with torch.compile (whatever fits in the time left)
#
# Usage (repository root):
#   bash scripts/gpu_benchmark.sh                    # on the GPU machine; results in $OUT
#   DEVICE=cpu QUICK=1 bash scripts/gpu_benchmark.sh # tiny sizes on the CPU, to check the flow
#
# Environment: OUT (results folder; default runs/gpu_benchmark), DEVICE (cuda|cpu), QUICK (1 = tiny sizes),
# BUDGET (seconds for the whole script; default 530), PARTS (default "rn50 data paper compile"; e.g. PARTS=compile
# for a second call when the first ran out of time), THREADS (torch threads, CPU runs), PYTHON.
# DALI: when it is not importable and $DALI_PARTS/dali-part-* exist (default .gpu/, made by
# /work/shared/gpu/pack_dali.sh and carried to the machine), it is installed from them into /tmp/site first.
# Each part runs under `timeout` (capped by the time left) and a failing part does not stop the others;
# tools/benchmark.py rewrites its JSON after every row, so a part cut short keeps its finished rows.
# Files in $OUT (at most 8, flat): summary.md, log.txt, rn50.json, data.json, loader.json, paper.json,
# compile.json.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-runs/gpu_benchmark}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-530}
PARTS=${PARTS:-rn50 data paper compile}
PY=${PYTHON:-python3}
JPEGS=${JPEGS:-/tmp/gpu_bench_jpegs}
DALI_PARTS=${DALI_PARTS:-.gpu}
mkdir -p "$OUT"
START=$SECONDS
STATUS=()

if [[ $QUICK == 1 ]]; then
  IMG=32 B_RN50=2 B_SMALL=2 B_LARGE=2 WARM=1 STEPS=2 REPS=2 WORKERS=2
  UNIQUE=16 NFILES=64 CEIL=(--ceiling-size 256 --ceiling-copy-mib 32)
  COMPILE_ROWS=(--rows resnet18:bn:2 --mode infer)  # CPU compilation is slow: one small row checks the flow
else
  IMG=224 B_RN50=256 B_SMALL=128 B_LARGE=256 WARM=10 STEPS=20 REPS=3 WORKERS=12
  UNIQUE=512 NFILES=16384 CEIL=()
  COMPILE_ROWS=(--rows "resnet50:bn:$B_RN50" "resnet50:an:$B_RN50" --an-impl fused reference --mode both)
fi
COMMON=(--device "$DEVICE" --img-size "$IMG" --precision bf16 --channels-last --warmup "$WARM" --steps "$STEPS"
  --repeats "$REPS" ${THREADS:+--threads "$THREADS"})

left() { echo $((BUDGET - (SECONDS - START))); }

# part NAME CAP_SECONDS COMMAND...: runs COMMAND (a program or an exported function of this script) under a
# timeout of min(CAP, time left); never fails.
part() {
  local name=$1 cap=$2 t0=$SECONDS rc
  shift 2
  local t
  t=$(left)
  ((cap < t)) && t=$cap
  if ((t < 20)); then
    echo "=== $name: skipped, out of time ==="
    STATUS+=("$name: skipped (out of time)")
    return 0
  fi
  echo "=== $name (timeout ${t}s, $(left)s left) ==="
  timeout -k 10 "$t" bash -c '"$@"' bash "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s ==="
  STATUS+=("$name: exit $rc, $((SECONDS - t0))s$( ((rc == 124 || rc == 137)) && echo ' (timed out)')")
  return 0
}

want() { [[ " $PARTS " == *" $1 "* ]]; }

setup_dali() {
  if $PY -c "import nvidia.dali" 2>/dev/null; then
    return 0
  fi
  if compgen -G "$DALI_PARTS/dali-part-*" >/dev/null; then
    echo "installing DALI from $DALI_PARTS/dali-part-*"
    mkdir -p /tmp/w && cat "$DALI_PARTS"/dali-part-* | tar -x -C /tmp/w &&
      $PY -m pip install -q --no-index --no-deps --target /tmp/site /tmp/w/*.whl &&
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

# ImageNet-sized JPEGs (500x375, ~90 KB): UNIQUE generated in parallel, hard-linked up to NFILES in 8 classes.
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
for split in ("train", "val"):
    for i in range(total if split == "train" else unique):
        d = root / split / f"n{i % 8:08d}"
        d.mkdir(parents=True, exist_ok=True)
        dst = d / f"img_{i:06d}.JPEG"
        if not dst.exists():
            os.link(src / f"img_{i % unique:06d}.JPEG", dst)
print(f"{total} training JPEGs ({unique} distinct) in {root}")
PY
}

bench_loader() {  # bench_loader BACKEND: appends the result line to loader.json (one JSON object per line)
  local tmp
  tmp=$(mktemp)
  $PY tools/bench_loader.py --data-root "$JPEGS" --backend "$1" --device "$DEVICE" --batch-size "$B_RN50" \
    --steps $((STEPS * 2)) --warmup "$WARM" --workers "$WORKERS" --img-size "$IMG" --channels-last | tee "$tmp"
  local rc=${PIPESTATUS[0]}
  tail -n 1 "$tmp" | grep '^{' >>"$OUT/loader.json"
  rm -f "$tmp"
  return "$rc"
}

run_all() {
  echo "gpu_benchmark: DEVICE=$DEVICE QUICK=$QUICK BUDGET=${BUDGET}s PARTS='$PARTS' OUT=$OUT"
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs, $($PY --version 2>&1)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  rm -f "$OUT"/{rn50,data,loader,paper,compile}.json
  setup_dali
  local dali_backend=""
  if $PY -c "import nvidia.dali" 2>/dev/null; then
    dali_backend=$([[ $DEVICE == cpu ]] && echo dali_cpu || echo dali)
    echo "DALI $($PY -c 'import nvidia.dali as d; print(d.__version__)'): backend $dali_backend"
  else
    echo "DALI is not importable: the dali runs are skipped"
  fi

  if want rn50; then
    part rn50 170 $PY tools/benchmark.py "${COMMON[@]}" --ceilings "${CEIL[@]}" \
      --rows "resnet50:bn:$B_RN50" "resnet50:an:$B_RN50" --an-impl reference fused --mode both \
      --json "$OUT/rn50.json"
  fi

  if want data; then
    part jpegs 60 make_jpegs
    [[ -n $dali_backend ]] && part "loader-$dali_backend" 60 bench_loader "$dali_backend"
    part loader-torch 60 bench_loader torch
    part "train-${dali_backend:-torch}" 110 $PY tools/benchmark.py "${COMMON[@]}" \
      --rows "resnet50:bn:$B_RN50" "resnet50:an:$B_RN50" --mode train --backend "${dali_backend:-torch}" \
      --data-root "$JPEGS" --workers "$WORKERS" --json "$OUT/data.json"
  fi

  if want paper; then
    part paper 210 $PY tools/benchmark.py "${COMMON[@]}" --mode train --warmup $((WARM / 2 + 1)) \
      --steps $((STEPS / 2)) \
      --rows "resnet101:bn:$B_SMALL" "resnet101:an:$B_SMALL" "mobilenetv2:bn:$B_SMALL" "mobilenetv2:an:$B_SMALL" \
      "densenet121:bn:$B_LARGE" "densenet121:an:$B_LARGE" "aognet12m:bn:$B_LARGE" "aognet12m:an:$B_LARGE" \
      "aognet40m:bn:$B_SMALL" "aognet40m:an:$B_SMALL" "resnet50:gn:$B_RN50" "resnet50:sn:$B_RN50" \
      "resnet50:se:$B_RN50" --json "$OUT/paper.json"
  fi

  if want compile; then
    part compile 600 $PY tools/benchmark.py "${COMMON[@]}" --compile on "${COMPILE_ROWS[@]}" --json "$OUT/compile.json"
  fi

  echo
  echo "=== parts ==="
  printf '%s\n' "${STATUS[@]}"
  echo "total $((SECONDS - START))s"
  summarize
}

# The summary: every table and the loader lines in summary.md, and a short table on stdout.
summarize() {
  $PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path

from tools.benchmark import format_ceilings, format_table

out = Path(sys.argv[1])
md, short = ["# GPU benchmark", ""], []
for name in ("rn50", "data", "paper", "compile"):
    path = out / f"{name}.json"
    if not path.exists():
        md += [f"## {name}", "", "(no result)", ""]
        continue
    res = json.loads(path.read_text())
    env = res["environment"]
    md += [f"## {name}", "", f"`{env['command']}`", "", f"{env['device_name']}, torch {env['torch']}, "
           f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, git {env['git_revision']}", ""]
    if res.get("ceilings"):
        md += [format_ceilings(res["ceilings"], env), ""]
        short.append(format_ceilings(res["ceilings"], env))
    md += [format_table(res["rows"]) if res["rows"] else "(no rows)", ""]
    for r in res["rows"]:
        impl = r.get("an_impl", "auto") if r.get("norm", "").startswith("an") else "-"
        data = "fixed" if r.get("backend") == "none" else r.get("backend")
        if r.get("error"):
            result = "ERROR " + r["error"].splitlines()[0][:60]
        else:
            result = f"{r['images_per_sec']:9.1f} img/s {r['peak_mem_mib']:8.0f} MiB"
            if r.get("loader_images_per_sec"):
                result += f"  loader {r['loader_images_per_sec']:.0f} img/s, wait {100 * r['data_wait_frac']:.0f}%"
        short.append(f"{name:8s} {r['model']:12s} {r['norm']:5s} {impl:9s} b{r['batch_size']:<4d} "
                      f"{'compiled' if r['compile'] else 'eager':8s} {r['mode']:5s} {data:9s} {result}")
loader = out / "loader.json"
if loader.exists():
    md += ["## loader only (tools/bench_loader.py)", "", "| backend | batch | workers | img/s |", "|---|---|---|---|"]
    for line in loader.read_text().splitlines():
        r = json.loads(line)
        md.append(f"| {r['backend']} | {r['batch_size']} | {r['workers']} | {r['images_per_sec']:.1f} |")
        short.append(f"loader   {r['backend']:9s} b{r['batch_size']:<4d} workers {r['workers']:<3d} "
                     f"{r['images_per_sec']:9.1f} img/s")
    md.append("")
(out / "summary.md").write_text("\n".join(md))
print("\n=== summary ===")
print("\n".join(short))
PY
}

export -f make_jpegs bench_loader
export PY JPEGS UNIQUE NFILES OUT DEVICE B_RN50 STEPS WARM WORKERS IMG
run_all 2>&1 | tee "$OUT/log.txt"
