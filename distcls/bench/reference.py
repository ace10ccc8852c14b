"""reference: distcls beside torchvision's reference training step on the same recipe, at 1 and 2 processes.

Writes an image folder (default 6,000 PNGs of 32x32 RGB, 10 classes, in train/ and 500 in val/:
scikit-learn's handwritten digits, enlarged and tinted per file) under a temp dir, then each round
runs, in rotated order:
- distcls: `python -m distcls.train` (torchrun for 2 processes) with the recipe below;
- the reference: `python -m distcls.bench.reference_loop` (torchrun for 2), which does per step what
  torchvision's references/classification/train.py does: per-image transforms.v2 in the DataLoader
  workers, its Mixup/CutMix collate, DistributedSampler, DDP, the EMA, a host read of loss and
  accuracy every step.
Recipe for both, in fp32 on the CPU or the GPU (torchvision's script without --amp; distcls's
train.amp=none): ResNet-18 (torchvision's), RandomResizedCrop 32 + flip + TrivialAugmentWide +
random erasing 0.1 + Mixup 0.2 / CutMix 1.0 + label smoothing 0.1, SGD momentum 0.9, weight decay
2e-5 (norm layers 0), the model EMA every `--ema-steps` (32), global batch `--batch`, `--workers` DataLoader
workers per process. Images/s: the global training images/s of every epoch after the first
(distcls's metrics.jsonl; the reference times its epochs the same way: start to last step).
Headline: distcls / reference per round at each world size, median over rounds. Child processes
get OMP_NUM_THREADS=1 unless it is set (both alike). Numbers are never test thresholds.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from distcls.bench.common import child_env, machine, module_cmd, run_quiet, train_cmd
from distcls.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=6000, help="training PNGs to write (default 6000, at least 10)")
    parser.add_argument("--size", type=int, default=32, help="image and crop size (default 32)")
    parser.add_argument("--batch", type=int, default=128, help="global batch (default 128)")
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers per process, both systems (default 2)"
    )
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per run; the first is warm-up (default 3, at least 2)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--nprocs", default="1,2", help="world sizes to measure, comma-separated (default 1,2)")
    parser.add_argument(
        "--ema-steps", type=int, default=32, help="optimizer steps between EMA updates, both systems (default 32)"
    )
    parser.add_argument(
        "--persistent-workers",
        action="store_true",
        help="the reference keeps its DataLoader workers between epochs, as distcls does (torchvision's makes them "
             "anew)",
    )
    parser.add_argument("--root", help="use this image folder (train/<class>/*, val/<class>/*) instead of writing one")


def write_digit_folder(root: Path, train: int, val: int, size: int, seed: int = 0) -> Path:
    """`train` + `val` RGB PNGs of size x size in root/{train,val}/<digit>/: scikit-learn's 8x8 digits
    enlarged (bilinear) and tinted with a random colour per file, so no two files are equal."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(digits.target == c) for c in range(10)]
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            j = int(rng.choice(by_class[i % 10]))  # the classes in turn: every class in both splits
            gray = (digits.images[j] * (255.0 / 16.0)).astype(np.uint8)
            big = np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
            tint = rng.uniform(0.3, 1.0, size=3)
            rgb = np.clip(big[..., None] * tint * 255 + rng.integers(0, 20, size=(size, size, 3)), 0, 255).astype(
                np.uint8
            )
            folder = root / split / str(int(digits.target[j]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(folder / f"{i:06d}.png")
    return root


def distcls_overrides(args, root: Path) -> list:
    return [
        "data.name=imagefolder",
        f"data.root={root}",
        f"data.batch_size={args.batch}",
        f"data.eval_batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"data.train_crop_size={args.size}",
        f"data.eval_crop_size={args.size}",
        f"data.eval_resize={args.size}",
        "data.augment.random_resized_crop=true",
        "data.augment.hflip=true",
        "data.augment.policy=trivialaugment",
        "data.augment.erase_prob=0.1",
        "data.mix.mixup_alpha=0.2",
        "data.mix.cutmix_alpha=1.0",
        "model.name=resnet18",
        "optim.name=sgd",
        "optim.lr=0.1",
        "optim.momentum=0.9",
        "optim.weight_decay=0.00002",
        "optim.norm_weight_decay=0.0",
        "sched.name=cosine",
        "sched.interval=epoch",
        "train.label_smoothing=0.1",
        "train.ema.enabled=true",
        f"train.ema.every_steps={args.ema_steps}",
        "train.ema.decay=0.999",
        f"train.epochs={args.epochs}",
        "log.every_steps=0",
        "log.plots=false",  # after training, outside the measured epochs: only time spent
        "checkpoint.every_epochs=0",
        "run.seed=0",
    ]


def _distcls(args, root: Path, nproc: int, out: Path) -> float:
    from distcls.tracking import read_jsonl

    run_quiet(train_cmd(["--config", "default", *distcls_overrides(args, root), f"run.out_dir={out}"], nproc))
    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train" and "skipped_steps" in r]
    return statistics.median(r["images_per_sec"] for r in epochs[1:])


def _reference(args, root: Path, nproc: int, out: Path) -> float:
    loop = [
        "--root", str(root), "--out", str(out), "--epochs", str(args.epochs), "--batch", str(args.batch),
        "--workers", str(args.workers), "--crop", str(args.size), "--ema-steps", str(args.ema_steps),
        *(["--persistent-workers"] if args.persistent_workers else []),
    ]
    run_quiet(module_cmd("distcls.bench.reference_loop", loop, nproc))
    return statistics.median(json.loads(out.read_text())["images_per_sec_per_epoch"])


def run(args) -> dict:
    try:
        nprocs = [int(n) for n in args.nprocs.split(",") if n.strip()]
    except ValueError:
        nprocs = []
    if not nprocs or min(nprocs) < 1:
        raise UserError(f"--nprocs {args.nprocs!r}: give world sizes such as 1,2")
    if any(args.batch % (2 * n) for n in nprocs):
        raise UserError(
            f"--batch {args.batch}: each process's share must be even (Mixup/CutMix pairs) at every world size in "
            f"--nprocs {args.nprocs}; use a multiple of {2 * max(nprocs)}"
        )
    for name, value, least in (
        ("--epochs", args.epochs, 2),
        ("--rounds", args.rounds, 1),
        ("--ema-steps", args.ema_steps, 1),
        ("--size", args.size, 8),
        ("--images", args.images, 10),
        ("--workers", args.workers, 0),
    ):
        if value < least:
            raise UserError(f"{name} {value}: must be at least {least}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="distcls-bench-") as tmp:
        root = Path(args.root) if args.root else write_digit_folder(Path(tmp) / "images", args.images, 500, args.size)
        runs = [(system, n) for n in nprocs for system in ("distcls", "reference")]
        ips = {f"{s}_w{n}": [] for s, n in runs}
        started = time.perf_counter()
        for r in range(args.rounds):
            for system, n in runs[r % len(runs):] + runs[:r % len(runs)]:
                out = Path(tmp) / f"{system}_w{n}_{r}"
                measure = _distcls if system == "distcls" else _reference
                ips[f"{system}_w{n}"].append(
                    round(measure(args, root, n, out if system == "distcls" else out.with_suffix(".json")), 1)
                )
    ratios = {f"w{n}": [round(a / b, 3) for a, b in zip(ips[f"distcls_w{n}"], ips[f"reference_w{n}"])] for n in nprocs}
    return {
        "mode": "reference",
        "machine": machine(),
        "setup": {
            "images": args.images,
            "size": args.size,
            "batch": args.batch,
            "workers": args.workers,
            "epochs": args.epochs,
            "reference_persistent_workers": args.persistent_workers,
            "ema_steps": args.ema_steps,
            "rounds": args.rounds,
            "root": args.root,
            "OMP_NUM_THREADS": child_env()["OMP_NUM_THREADS"],
        },
        "images_per_sec": ips,
        "median_images_per_sec": {k: round(statistics.median(v), 1) for k, v in ips.items()},
        "per_round_ratios": ratios,
        "ratios": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }


def render(result: dict) -> None:
    print(json.dumps(result, indent=2))
    s, med = result["setup"], result["median_images_per_sec"]
    print(
        f"\nResNet-18, {s['size']} px, global batch {s['batch']}, {s['workers']} workers per process, {s['rounds']} "
        f"rounds, OMP_NUM_THREADS={s['OMP_NUM_THREADS']}\n| processes | distcls images/s | reference images/s | "
        "distcls / reference (median) | per round |\n|---|---|---|---|---|"
    )
    for key, ratio in result["ratios"].items():
        n = key[1:]
        print(f"| {n} | {med['distcls_w' + n]:,.0f} | {med['reference_w' + n]:,.0f} | {ratio:.3f} | "
              f"{' '.join(map(str, result['per_round_ratios'][key]))} |")
