"""`python -m distcls.evaluate --checkpoint P [--split test|val|train] [--json] [--out-dir DIR] [key.sub=value ...]`

Exact evaluation of a checkpoint (also under torchrun: every sample counted once): top-1 and
(with more than 5 classes) top-5 accuracy, per-class accuracy, the confusion matrix, and inference
speed on the device used (seed C's report): images/s at the eval batch size and per-image latency
at batch 1 (median, p95). `--json` prints the whole report as one JSON object on stdout; with
--out-dir it is also written to eval_<split>.json next to confusion, per-class and sample plots.
"""
from __future__ import annotations

import argparse
from distcls.tracking import json_out
from pathlib import Path
from typing import Sequence

from distcls.runtime import dist, launch
from distcls.cli import ArgumentParser, exit_with, positive_int
from distcls.data import build_data, eval_loader
from distcls.engine import evaluate
from distcls.errors import UserError
from distcls.checkpoint.restore import check_stored_plugins, measure_speed, restore
from distcls.runtime.atomic_files import atomic_write_text
from distcls.run.outputs import check_output_dir


def parse_args(argv: Sequence[str]):
    p = ArgumentParser(prog="python -m distcls.evaluate", description="Evaluate a distcls checkpoint on a data split.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--nproc_per_node",
        metavar="N",
        help="evaluate on N ranks of this node (torch's elastic launch), exit with distcls's exit code",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. runs/x/checkpoints/best.pt)")
    p.add_argument(
        "--ema",
        action="store_true",
        help="use the checkpoint's model EMA weights (trained with train.ema.enabled=true) instead of its trained "
             "weights",
    )
    p.add_argument("--split", choices=["test", "val", "train"], default="test", help="which split to evaluate")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout (nothing else)")
    p.add_argument("--no-speed", action="store_true", help="skip the throughput and latency measurement")
    p.add_argument(
        "--out-dir",
        help="write eval_<split>.json, confusion_<split>.png, per_class_<split>.png and samples_<split>.png here",
    )
    p.add_argument("--samples", type=positive_int, default=16, help="images in the sample grid (with --out-dir)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. data.root=/data/cifar")
    return p.parse_args(argv)


def _device_choice(overrides: Sequence[str]) -> str:
    """dist.device from the overrides (auto: the rank's GPU when there is one); restore() validates it with the rest."""
    from distcls.config import parse_override
    chosen = [value for key, value in (parse_override(o) for o in overrides) if key == "dist.device"]
    return chosen[-1] if chosen and chosen[-1] in ("auto", "cpu", "cuda") else "auto"


def main(argv: Sequence[str]) -> int:
    nproc, argv = launch.strip_nproc(argv)
    if nproc is not None:  # N ranks through torch's elastic launch, distcls's exit code (runtime/launch.py)
        parse_args(argv)
        return launch.launch("evaluate", argv, nproc)
    args = parse_args(argv)
    if args.out_dir:
        check_output_dir(args.out_dir, "--out-dir")  # before the work, not after it
    env = dist.detect(_device_choice(args.overrides))
    restored = restore(args.checkpoint, env.device, args.overrides, ema=args.ema)
    check_stored_plugins(restored.checkpoint.config, args.checkpoint, args.overrides, sections=("data",))
    cfg, spec = restored.cfg, restored.spec
    dist.init(env, cfg.dist.timeout_s)
    try:
        data = build_data(cfg)
        if (data.spec.channels, data.spec.num_classes) != (spec.channels, spec.num_classes):
            raise UserError(
                f"the data has {data.spec.channels} channels / {data.spec.num_classes} classes, the checkpoint "
                f"{spec.channels} / {spec.num_classes}"
            )
        view = getattr(data.splits, args.split)
        if view is None:
            raise UserError(f"this config has no {args.split} split (data.val_fraction=0?); choose --split test")
        batch = max(cfg.data.eval_batch_size or cfg.data.batch_size, env.world_size)
        loader = eval_loader(view, batch, env.world_size, env.rank, env.device, cfg.data.num_workers)
        result = evaluate(restored.model, loader, restored.preprocess, spec.num_classes)
        if env.is_main:
            speed = None
            if not args.no_speed:
                first = next(iter(eval_loader(view.truncated(batch), batch, 1, 0, env.device)))
                speed = measure_speed(restored.model, restored.preprocess, first.images, batch)
            report(
                args, build_report(args, result, spec, speed, env.world_size), result, spec, view, restored, env.device
            )
    finally:
        dist.teardown()
    return 0


def build_report(args, result, spec, speed, world_size: int) -> dict:
    names = spec.labels
    return {
        "checkpoint": str(args.checkpoint),
        "weights": "ema" if args.ema else "model",
        "split": args.split,
        "count": result.count,
        "acc": result.acc,
        "top5_acc": result.top5_acc,
        "loss": result.loss,
        "world_size": world_size,
        "per_class_acc": dict(zip(names, result.per_class_acc)),
        "per_class_count": dict(zip(names, result.confusion.sum(1).tolist())),
        "class_names": names,
        "confusion": result.confusion.tolist(),
        "speed": speed,
    }


def report(args, payload: dict, result, spec, view, restored, device) -> None:
    if args.json:
        print(json_out.dumps(payload))
    else:
        print(
            f"{args.split} accuracy {result.acc:.4f} ({int(result.confusion.diag().sum())}/{result.count}), loss "
            f"{result.loss:.4f}"
            + (f", top-5 accuracy {result.top5_acc:.4f}" if result.top5_acc is not None else "")
        )
        print("per-class accuracy:")
        for name, acc in payload["per_class_acc"].items():
            print(f"  {name:>16s}  {acc:.4f}  ({payload['per_class_count'][name]} samples)")
        speed = payload["speed"]
        if speed:
            lat = speed["latency_ms_batch1"]
            print(
                f"inference on {speed['device']}: {speed['images_per_sec']:,.0f} images/s at batch "
                f"{speed['batch_size']}; latency at batch 1: median {lat['median']:.2f} ms, p95 {lat['p95']:.2f} ms"
            )
    if not args.out_dir:
        return
    from distcls.tracking.plots import SampleSource, plot_confusion, plot_per_class, plot_samples
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = args.split
    atomic_write_text(out / f"eval_{split}.json", json_out.dumps(payload, indent=2) + "\n")
    written = [out / f"eval_{split}.json",
               plot_confusion(result.confusion, payload["class_names"], out / f"confusion_{split}.png", split),
               plot_per_class(result.confusion, payload["class_names"], out / f"per_class_{split}.png", split)]
    if args.samples:
        written.append(
            plot_samples(
                SampleSource(restored.model, restored.preprocess, view, device),
                payload["class_names"],
                args.samples,
                out / f"samples_{split}.png",
                split,
            )
        )
    if not args.json:
        print("wrote " + ", ".join(str(p) for p in written))


def cli() -> None:
    exit_with(main)


if __name__ == "__main__":
    cli()
