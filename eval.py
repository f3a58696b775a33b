"""Evaluate a checkpoint: top-1/top-5 over every validation image, as one JSON line.

The model is rebuilt from the config stored inside the checkpoint, so no config file is needed::

    python eval.py --checkpoint runs/resnet50_an/best.pth
    python eval.py --checkpoint runs/resnet50_an/best.pth --data-root /data/imagenet --backend dali --ema
    torchrun --standalone --nproc_per_node 8 eval.py --checkpoint runs/resnet50_an/best.pth

The line printed (rank 0) holds ``top1``, ``top5``, ``count``, ``loss``, ``model``, ``norm``,
``checkpoint`` and more; it is also written next to the checkpoint as ``<name>.eval.json``
(``<name>.ema.eval.json`` with ``--ema``). With the same data and settings it reproduces the number
the trainer logged for that epoch. Extra ``section.key=value`` overrides (e.g. ``data.crop_pct=0.95``)
change evaluation settings; ``--config FILE`` rebuilds the model from a config file instead, and
then the checkpoint must hold weights of that model.

The dataset must be the one the model was trained for: its class folders are compared with the class
list saved in the checkpoint (or, for a checkpoint without one, e.g. a converted official model, their
number with ``model.num_classes``), and a mismatch stops with a message. Synthetic (random) images are
evaluated only for a checkpoint trained on synthetic data, or with ``--allow-synthetic``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine import checkpoint as ck
from engine import distributed as du
from engine.build import build_loaders, build_model, check_dataset_classes, expand_path, memory_format_of
from engine.config import ConfigError, checkpoint_config, validate_model
from engine.errors import main_guard
from engine.loop import amp_dtype, evaluate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (last.pth, best.pth)")
    parser.add_argument("--data-root", default=None, help="dataset root (default: the one stored in the checkpoint)")
    parser.add_argument("--backend", default=None, choices=["dali", "dali_cpu", "torch", "synthetic"])
    parser.add_argument("--batch-size", type=int, default=None, help="per-process evaluation batch")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--config", default=None, help="build the model from this config instead of the stored one")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--output", default=None, help="JSON file to write (default: next to the checkpoint)")
    parser.add_argument(
        "--allow-synthetic",
        action="store_true",
        help="evaluate random images (data.backend=synthetic) although the checkpoint was trained on real ones",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of evaluation settings")
    return parser.parse_intermixed_args(argv)


def resolve_config(args, ckpt: dict):
    path = Path(args.checkpoint)
    cfg = checkpoint_config(ckpt, path, args.config, args.overrides)
    if args.data_root is not None:
        cfg.data.root = args.data_root
    if args.backend is not None:
        cfg.data.backend = args.backend
    if args.batch_size is not None:
        cfg.data.eval_batch_size = args.batch_size
    if args.workers is not None:
        cfg.data.workers = args.workers
    cfg.data.root = expand_path(cfg.data.root)
    validate_model(cfg, args.config or str(path))
    check_data_source(args, ckpt, cfg)
    return cfg


def check_data_source(args, ckpt: dict, cfg) -> None:
    """Refuses an evaluation on synthetic (random) images that the user cannot have meant."""
    if cfg.data.backend != "synthetic":
        return
    path = Path(args.checkpoint)
    if args.data_root is not None:
        stored = " (the backend stored in the checkpoint)" if args.backend is None else ""
        raise ConfigError(
            f"--data-root {args.data_root} is given but data.backend is 'synthetic'{stored}, which generates random "
            f"images and reads no folder. Add --backend torch (or dali, dali_cpu) to evaluate {path} on the images "
            f"in {args.data_root}."
        )
    trained = ((ckpt.get("config") or {}).get("data") or {}).get("backend")
    if trained != "synthetic" and not args.allow_synthetic:
        what = f"data.backend={trained}" if trained else "real images"
        raise ConfigError(
            f"{path} was trained on {what}, but this evaluation would use data.backend=synthetic: random images, "
            f"whose accuracy says nothing about the model. Pass --data-root DIR (with --backend torch, dali or "
            f"dali_cpu) to evaluate real images, or --allow-synthetic to evaluate random ones anyway (a smoke test)."
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ckpt_path = Path(args.checkpoint)
    ckpt = ck.load_checkpoint(ckpt_path, map_location="cpu")
    cfg = resolve_config(args, ckpt)
    dist_info = du.init_distributed(cfg.dist.backend, cfg.dist.timeout_minutes, device=args.device)
    try:
        state = ck.model_weights(ckpt, ckpt_path, args.ema)
        model = build_model(cfg)
        ck.load_model_state(model, state, ckpt_path)
        model = model.to(device=dist_info.device, memory_format=memory_format_of(cfg))
        loaders = build_loaders(cfg, dist_info, build_train=False)
        try:
            check_dataset_classes(ckpt.get("classes"), cfg, loaders, ckpt_path)
            result = evaluate(model, loaders.val, dist_info.device, amp_dtype(cfg.train.amp))
        finally:
            loaders.close()
        record = {
            "top1": result["top1"],
            "top5": result["top5"],
            "count": result["count"],
            "skipped": result["skipped"],
            "loss": result["loss"],
            "model": cfg.model.name,
            "norm": cfg.model.norm,
            "attn_layer": cfg.model.options.get("attn_layer"),
            "checkpoint": str(ckpt_path),
            "ema": args.ema,
            "epoch": ckpt.get("epoch"),
            "params": sum(p.numel() for p in model.parameters()),
            "data_root": cfg.data.root,
            "backend": cfg.data.backend,
            "img_size": cfg.data.img_size,
            "crop_pct": cfg.data.crop_pct,
            "world_size": dist_info.world_size,
            "recipe": {
                "epochs": cfg.sched.epochs,
                "label_smoothing": cfg.train.label_smoothing,
                "mixup": cfg.train.mixup,
                "deep_stem": cfg.model.options.get("deep_stem", False),
            },
            "git_rev": ckpt.get("git_rev"),
        }
        if dist_info.is_main:
            line = json.dumps(record)
            print(line, flush=True)
            out = (
                Path(args.output)
                if args.output
                else ckpt_path.with_suffix(".ema.eval.json" if args.ema else ".eval.json")
            )
            out.write_text(line + "\n")
        return 0
    finally:
        du.cleanup()


if __name__ == "__main__":
    sys.exit(main_guard(main))
