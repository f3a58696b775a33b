"""Convert a checkpoint of the AN authors' released ImageNet models into a checkpoint of this framework.

The official release ships, per table row, a zip holding ``config.yaml`` and ``model_best.pth.tar``::

    python tools/convert_checkpoint.py --from aognet-v2 resnet50_an_official/ resnet50_an.pth
    python tools/convert_checkpoint.py --from aognet-v2 model_best.pth.tar out.pth --config configs/resnet50_an.yaml
    python tools/convert_checkpoint.py --from aognet-v2 model_best.pth.tar out.pth --model resnet50 --norm an \\
        --set model.deep_stem=true --set model.avg_down=true

The model, norm and options are read from the official ``config.yaml`` (in the folder, or next to the file);
``--config`` (the official config or one of ours) or ``--model/--norm`` say it for a bare file. The output
is evaluated with ``python eval.py --checkpoint OUT.pth --data-root DIR`` and starts a training run with
``train.init_from=OUT.pth`` (weights only). Every official key must map onto exactly one key of ours and every
key of ours must be filled, or nothing is written. See docs/AN.md 7 and :mod:`tools.official`.

Files holding pickled objects other than tensors (the official optimizer state holds apex's loss scaler) are
refused unless ``--trust-pickle`` says the file comes from a source you trust.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from engine.errors import main_guard
from tools.official import FORMATS, convert


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="format of the input checkpoint")
    p.add_argument("path", help="official run folder (config.yaml + model_best.pth.tar) or a .pth.tar file")
    p.add_argument("out", help="checkpoint of this framework to write (e.g. resnet50_an.pth)")
    p.add_argument("--config", default=None, help="official config.yaml or a config of ours describing the model")
    p.add_argument("--model", default=None, help="model name of ours (with --norm), for a file without config")
    p.add_argument("--norm", default=None, help="norm type of ours: bn or an")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override"
    )
    p.add_argument("--trust-pickle", action="store_true", help="allow pickled objects other than tensors")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Converts; a bad input raises ConversionError (``main_guard`` prints it and exits with status 2)."""
    args = parse_args(argv)
    r = convert(args.path, args.out, args.config, args.model, args.norm, tuple(args.overrides), args.trust_pickle)
    options = "".join(f", {k}={v}" for k, v in r["options"].items())
    best = f"{r['best_prec1']:.3f}%" if r["best_prec1"] is not None else "not recorded"
    print(f"Read {r['checkpoint']} ({r['described_by']})")
    print(f"  model {r['model']} (norm {r['norm']}{options}), {r['num_classes']} classes")
    print(f"  epoch {r['epoch']}, official best top-1 {best}")
    print(f"Wrote {r['out']}: {r['tensors']} tensors, {r['parameters'] / 1e6:.3f}M parameters, float32")
    print(f"  evaluate: python eval.py --checkpoint {r['out']} --data-root DIR")
    print(f"  fine-tune: python train.py --config CONFIG.yaml train.init_from={r['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
