"""`python -m distcls.plot OUT_DIR [--checkpoint P] [--no-eval] [--samples N] [key.sub=value ...]`

(Re)make a run's pictures into OUT_DIR/plots/ from its files, at any time: while it trains, after
it stopped, or long after it finished. The curves and the learning-rate schedule come from
metrics.jsonl and config.yaml; the confusion matrix, per-class accuracy and sample grid come from
evaluating a checkpoint (default: checkpoints/last.pt, which at the end of a run holds the final
weights that summary.json's test accuracy belongs to) on the test split, in this one process.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from distcls.cli import ArgumentParser, exit_with
from distcls.errors import UserError
from distcls.run.outputs import check_output_dir


def parse_args(argv: Sequence[str]):
    p = ArgumentParser(
        prog="python -m distcls.plot",
        description="Make a run's plots (OUT_DIR/plots/*.png) from its files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "out_dir", metavar="OUT_DIR", help="the run's run.out_dir (holds metrics.jsonl, config.yaml, checkpoints/)"
    )
    p.add_argument(
        "--checkpoint",
        help="one of OUT_DIR's checkpoints for the test-set plots (default: OUT_DIR/checkpoints/last.pt, else best.pt)",
    )
    p.add_argument("--no-eval", action="store_true", help="only the curves and the schedule (no checkpoint, no data)")
    p.add_argument("--samples", type=int, default=16, help="images in the sample grid (0 = no grid)")
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value",
        help="config overrides for the data, e.g. data.root=/data/cifar",
    )
    return p.parse_args(argv)


def default_checkpoint(out_dir: Path):
    for name in ("last.pt", "best.pt"):
        if (out_dir / "checkpoints" / name).is_file():
            return out_dir / "checkpoints" / name
    return None


def test_pictures(checkpoint, overrides, samples: int):
    """(test confusion matrix, class names, SampleSource) of a checkpoint, evaluated in this process."""
    from distcls.data import build_data, eval_loader
    from distcls.engine import evaluate
    from distcls.checkpoint.restore import restore
    from distcls.tracking.plots import SampleSource

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    restored = restore(str(checkpoint), device, overrides)
    cfg, spec = restored.cfg, restored.spec
    data = build_data(cfg)
    if (data.spec.channels, data.spec.num_classes) != (spec.channels, spec.num_classes):
        raise UserError(
            f"the data has {data.spec.channels} channels / {data.spec.num_classes} classes, the checkpoint "
            f"{spec.channels} / {spec.num_classes}"
        )
    loader = eval_loader(
        data.splits.test, cfg.data.eval_batch_size or cfg.data.batch_size, 1, 0, device, cfg.data.num_workers
    )
    result = evaluate(restored.model, loader, restored.preprocess, spec.num_classes)
    src = SampleSource(restored.model, restored.preprocess, data.splits.test, device) if samples else None
    return result.confusion, spec.class_names, src


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from distcls.tracking.plots import write_run_plots

    out = Path(args.out_dir)
    if not out.is_dir():
        raise UserError(f"{out} is not a directory; give a run's run.out_dir (e.g. runs/default)")
    if not (out / "metrics.jsonl").is_file() and not (out / "config.yaml").is_file():
        raise UserError(f"{out} holds no metrics.jsonl or config.yaml: not a distcls run directory")
    if args.samples < 0:
        raise UserError(f"--samples must be >= 0, got {args.samples}")
    check_output_dir(out / "plots", "the plots folder")  # before the evaluation, not after it
    if args.checkpoint and not args.no_eval and not _inside(Path(args.checkpoint), out):
        raise UserError(
            f"--checkpoint {args.checkpoint} is not one of {out}'s checkpoints: its test-set plots would replace this "
            f"run's; plot its own run (python -m distcls.plot RUN_DIR), or write its plots elsewhere with "
            f"python -m distcls.evaluate --checkpoint {args.checkpoint} --out-dir DIR"
        )
    confusion, names, src, problem = None, (), None, None
    if not args.no_eval:
        checkpoint = args.checkpoint or default_checkpoint(out)
        if checkpoint is None:
            print(f"no checkpoint in {out / 'checkpoints'} yet: plotting the curves only")
        else:
            try:
                confusion, names, src = test_pictures(checkpoint, args.overrides, args.samples)
            except UserError as exc:  # e.g. the data moved: the curves are still worth having
                problem = exc
    for path in write_run_plots(out, confusion, names, src, args.samples).values():
        print(f"wrote {path}")
    if problem is not None:
        raise UserError(f"{problem} (only the curves and the schedule were written)")
    return 0


def cli() -> None:
    exit_with(main)


if __name__ == "__main__":
    cli()
