#!/usr/bin/env bash
# The demo (the README's first command): a small AN ResNet on real handwritten digits, on the CPU.
#
#   bash scripts/demo.sh [section.key=value ...]
#
# 1. builds datasets/digits from scikit-learn's bundled digits (if it is not there yet),
# 2. trains configs/demo_digits.yaml (resumes if interrupted; a finished run is not retrained),
# 3. evaluates the best checkpoint with eval.py and checks it reproduces the trainer's number.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data=${DIGITS_ROOT:-datasets/digits}
if [[ ! -d "$data/train" || ! -d "$data/val" ]]; then
  python tools/make_digits.py --out "$data"
fi
python train.py --config demo_digits.yaml data.root="$data" "$@"
run=$(python - "$@" <<'PY'
import sys
from engine.config import load_config
print(load_config("demo_digits.yaml", sys.argv[1:]).train.output_dir)
PY
)
python eval.py --checkpoint "$run/best.pth" --data-root "$data"
python - "$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text())
result = json.loads((run / "best.eval.json").read_text())
same = abs(result["top1"] - summary["best_top1"]) < 1e-9
print(f"demo: trainer best top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), "
      f"eval.py top-1 {result['top1']:.2f} on {result['count']} images: {'same' if same else 'DIFFERENT'}")
sys.exit(0 if same else 1)
PY
