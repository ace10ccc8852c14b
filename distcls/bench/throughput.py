"""Training images/s of a config at world size 1 and 2 (gloo on CPU), through `python -m distcls.train`."""
from __future__ import annotations

import tempfile
from pathlib import Path

from distcls.bench.common import machine, run_train, summary


def add_arguments(parser) -> None:
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per run (images/s is distcls's own summary figure)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for both runs")


def run(args) -> dict:
    from distcls import config
    config.load(None, list(args.overrides))  # a bad override is one line now, not a failed run later
    result = {"mode": "throughput", "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="distcls-bench-") as tmp:
        for nproc in (1, 2):
            out = Path(tmp) / f"w{nproc}"
            run_train(
                [f"train.epochs={args.epochs}", "log.every_steps=0", *args.overrides, f"run.out_dir={out}"], nproc
            )
            s = summary(out)
            result[f"world_{nproc}_images_per_sec"] = round(s["train_images_per_sec"], 1)
            result[f"world_{nproc}_test_acc"] = round(s["test_acc"], 4) if s.get("test_acc") is not None else None
    result["ratio_world2_over_world1"] = round(result["world_2_images_per_sec"] / result["world_1_images_per_sec"], 3)
    return result
