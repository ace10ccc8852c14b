"""`python -m distcls.evaluate --checkpoint P [--split test|val] [--out-dir DIR] [key.sub=value ...]`

Exact evaluation of a checkpoint (also under torchrun: every sample counted once): overall and
per-class accuracy, confusion matrix, and with --out-dir a JSON report, a confusion-matrix plot
and a grid of sample images with predicted vs true labels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from distcls import dist
from distcls.cli import ArgumentParser, exit_with, positive_int
from distcls.data import build_data, eval_loader
from distcls.engine import evaluate
from distcls.errors import UserError
from distcls.inference import check_stored_plugins, restore
from distcls.io import atomic_write_text


def parse_args(argv: Sequence[str]):
    p = ArgumentParser(prog="python -m distcls.evaluate", description="Evaluate a distcls checkpoint on a data split.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. runs/x/checkpoints/best.pt)")
    p.add_argument("--split", choices=["test", "val", "train"], default="test", help="which split to evaluate")
    p.add_argument("--out-dir", help="write eval_<split>.json, confusion_<split>.png and samples_<split>.png here")
    p.add_argument("--samples", type=positive_int, default=16, help="images in the sample grid (with --out-dir)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. data.root=/data/cifar")
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    env = dist.detect()
    restored = restore(args.checkpoint, env.device, args.overrides)
    check_stored_plugins(restored.checkpoint["config"], args.checkpoint, args.overrides, sections=("data",))
    cfg, spec = restored.cfg, restored.spec
    dist.init(env, cfg.dist.timeout_s)
    try:
        data = build_data(cfg)
        if (data.spec.channels, data.spec.num_classes) != (spec.channels, spec.num_classes):
            raise UserError(f"the data has {data.spec.channels} channels / {data.spec.num_classes} classes, the checkpoint {spec.channels} / {spec.num_classes}")
        view = getattr(data.splits, args.split)
        if view is None:
            raise UserError(f"this config has no {args.split} split (data.val_fraction=0?); choose --split test")
        batch = cfg.data.eval_batch_size or cfg.data.batch_size
        loader = eval_loader(view, max(batch, env.world_size), env.world_size, env.rank, env.device, cfg.data.num_workers)
        result = evaluate(restored.model, loader, restored.preprocess, spec.num_classes)
        if env.is_main:
            report(args, result, spec, view, restored)
    finally:
        dist.teardown()
    return 0


def report(args, result, spec, view, restored) -> None:
    names = list(spec.class_names) or [str(i) for i in range(spec.num_classes)]
    print(f"{args.split} accuracy {result.acc:.4f} ({int(result.confusion.diag().sum())}/{result.count}), loss {result.loss:.4f}")
    print("per-class accuracy:")
    for name, acc, total in zip(names, result.per_class_acc, result.confusion.sum(1).tolist()):
        print(f"  {name:>16s}  {acc:.4f}  ({total} samples)")
    if not args.out_dir:
        return
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"checkpoint": str(args.checkpoint), "split": args.split, "acc": result.acc, "loss": result.loss,
               "count": result.count, "per_class_acc": dict(zip(names, result.per_class_acc)),
               "confusion": result.confusion.tolist(), "class_names": names}
    atomic_write_text(out / f"eval_{args.split}.json", json.dumps(payload, indent=2) + "\n")
    from distcls.tracking.plots import plot_confusion, plot_samples
    plot_confusion(result.confusion, names, out / f"confusion_{args.split}.png")
    plot_samples(restored, view, names, args.samples, out / f"samples_{args.split}.png")
    print(f"wrote {out / f'eval_{args.split}.json'}, confusion_{args.split}.png, samples_{args.split}.png")


def cli() -> None:
    exit_with(main)


if __name__ == "__main__":
    cli()
