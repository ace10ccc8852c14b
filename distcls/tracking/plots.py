"""Pictures of a run (matplotlib, Agg backend, PNG, every file written atomically).

    curves.png     loss and accuracy: train per logged interval and per epoch, val per epoch, test (x in epochs)
    lr.png         the learning-rate schedule (from config.yaml) with the logged values on it
    confusion.png  test confusion matrix with class names (rows normalized: the recall of each class)
    per_class.png  test accuracy per class, worst first, with the overall accuracy
    samples.png    test images, every class in turn, with predicted / true labels (wrong ones in red, framed)

Made at the end of training into <out_dir>/plots/, and any time from a run's files by
`python -m distcls.plot OUT_DIR` (distcls/plot.py). Readable for 10 and for 100+ classes: labels
thin out and figures grow with the number of classes.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Optional, Sequence

import torch

from distcls.spec import class_labels
from distcls.tracking.metrics import other_targets, target_name
from distcls.runtime.atomic_files import atomic_write_bytes

CURVES, LR, CONFUSION, PER_CLASS, SAMPLES = "curves", "lr", "confusion", "per_class", "samples"


def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, dpi: int = 100) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ------------------------------------------------------------------------- curves from metrics.jsonl


def steps_per_epoch(records: list) -> Optional[int]:
    """From epoch-end train records (global step / epoch), else the largest logged epoch_step."""
    ends = [r for r in records if r.get("split") == "train" and "epoch_step" not in r and r.get("epoch")]
    if ends:
        return max(1, round(ends[0]["step"] / ends[0]["epoch"]))
    inner = [r["epoch_step"] for r in records if "epoch_step" in r]
    return max(inner) if inner else None


def _x(record: dict, spe: Optional[int]) -> float:
    if "epoch_step" in record and spe:
        return record["epoch"] - 1 + record["epoch_step"] / spe
    return float(record["epoch"])


def _every(records: list) -> str:
    """How often the running train records were logged, in words (from their epoch_step spacing)."""
    from collections import Counter

    gaps = Counter(
        b["step"] - a["step"]
        for a, b in zip(records, records[1:])
        if "step" in a and "step" in b and b["step"] > a["step"]
    )
    return f"every {gaps.most_common(1)[0][0]} steps" if gaps else "logged steps"


_TARGET_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _target_label(prefix: str) -> str:
    return "model EMA" if prefix == "ema_" else target_name(prefix)


def plot_curves(records: list, path, run: str = "") -> Path:
    plt = _pyplot()
    spe = steps_per_epoch(records)
    train_int = [r for r in records if r.get("split") == "train" and "epoch_step" in r]
    train_ep = [r for r in records if r.get("split") == "train" and "epoch_step" not in r]
    val = [r for r in records if r.get("split") == "val"]
    test = [r for r in records if r.get("split") == "test"]
    # (prefix, colour) of each other evaluation target
    targets = list(zip(dict.fromkeys(p for r in val + test[-1:] for p in other_targets(r)), cycle(_TARGET_COLORS)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        if train_int:
            ax.plot([_x(r, spe) for r in train_int], [r[key] for r in train_int], color="tab:blue", alpha=0.35, lw=1,
                    label=f"training, running ({_every(train_int)})")
        if train_ep:
            ax.plot(
                [r["epoch"] for r in train_ep],
                [r[key] for r in train_ep],
                "o-",
                color="tab:blue",
                ms=4,
                label="training, epoch mean",
            )
        if val:
            ax.plot(
                [r["epoch"] for r in val], [r[key] for r in val], "s-", color="tab:orange", ms=4, label="validation"
            )
        # the other evaluation targets' numbers beside the weights' (the model EMA: train.ema.enabled)
        for prefix, color in targets:
            ours = [r for r in val if f"{prefix}{key}" in r]
            if ours:
                ax.plot([r["epoch"] for r in ours], [r[f"{prefix}{key}"] for r in ours], "s--", color=color, ms=4,
                        label=f"validation, {_target_label(prefix)}")
        if test:
            ax.plot(
                [test[-1]["epoch"]], [test[-1][key]], "*", color="tab:green", ms=12, label=f"test {test[-1][key]:.4f}"
            )
            for prefix, color in targets:
                if f"{prefix}{key}" in test[-1]:
                    ax.plot([test[-1]["epoch"]], [test[-1][f"{prefix}{key}"]], "*", color=color, ms=12,
                            label=f"test, {_target_label(prefix)} {test[-1][f'{prefix}{key}']:.4f}")
        # null: no sample
        values = [float(v) for line in ax.lines for v in line.get_ydata() if v is not None and math.isfinite(v)]
        if key == "loss" and values and min(values) > 0 and max(values) / min(values) > 30:
            ax.set_yscale("log")  # so a small train/val gap (overfitting) stays visible late in training
            label += " (log scale)"
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0].set_title("loss")
    axes[1].set_title("accuracy")
    fig.suptitle(run if records else f"{run}: no metrics recorded yet".lstrip(": "))
    return _save(fig, path)


def lr_schedule(config: dict, spe: int, epochs: int) -> list:
    """The learning rate after every optimizer step, recomputed from the run's config (no training)."""
    from distcls import config as config_mod
    from distcls.engine import build_scheduler
    cfg = config_mod.from_dict(config)
    # the schedule depends on the peak lr only
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg.sched, cfg.optim, spe, epochs)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(spe * epochs):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def plot_lr(records: list, config: Optional[dict], path, run: str = "") -> Path:
    plt = _pyplot()
    spe = steps_per_epoch(records)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if config is not None and spe:
        epochs = config["train"]["epochs"]
        lrs = lr_schedule(config, spe, epochs)
        ax.plot([i / spe for i in range(len(lrs))], lrs, color="tab:purple", lw=1.5,
                label=f"planned: {config['sched']['name']}, {config['sched']['warmup_epochs']} warmup epochs")
    logged = [r for r in records if r.get("split") == "train"]
    if logged:
        ax.plot(
            [_x(r, spe) for r in logged],
            [r["lr"] for r in logged],
            ".",
            color="black",
            ms=5,
            label="as the run logged it",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{run}: learning-rate schedule".lstrip(": "))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------------- test-set pictures


def _class_ticks(ax, names: list, axis: str) -> None:
    n = len(names)
    every = max(1, math.ceil(n / 100))
    pos = list(range(0, n, every))
    size = 9 if n <= 12 else 7 if n <= 30 else 5
    if axis == "x":
        ax.set_xticks(pos, [names[i] for i in pos], rotation=90, fontsize=size)
    else:
        ax.set_yticks(pos, [names[i] for i in pos], fontsize=size)


def plot_confusion(confusion: torch.Tensor, names: Sequence[str], path, split: str = "test", run: str = "") -> Path:
    plt = _pyplot()
    n = confusion.shape[0]
    names = class_labels(names, n)
    counts = confusion.double()
    rows = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = min(24.0, max(5.0, 0.14 * n + 3)) if n > 12 else max(5.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    _class_ticks(ax, names, "x")
    _class_ticks(ax, names, "y")
    if n <= 20:  # counts in the cells
        for i in range(n):
            for j in range(n):
                c = int(counts[i, j])
                if c:
                    ax.text(
                        j, i, c, ha="center", va="center", fontsize=8, color="white" if rows[i, j] > 0.5 else "black"
                    )
    acc = float(counts.diag().sum() / counts.sum().clamp(min=1))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{run}: confusion matrix ({split}: {int(counts.sum())} images, accuracy {acc:.4f})".lstrip(": "))
    return _save(fig, path, dpi=100 if n <= 30 else 130)  # small class labels stay legible when zoomed


def plot_per_class(confusion: torch.Tensor, names: Sequence[str], path, split: str = "test", run: str = "") -> Path:
    plt = _pyplot()
    n = confusion.shape[0]
    names = class_labels(names, n)
    counts = confusion.double()
    totals = counts.sum(1)
    acc = (counts.diag() / totals.clamp(min=1)).tolist()
    order = sorted(range(n), key=lambda i: (acc[i], names[i]), reverse=True)  # worst at the top (barh draws bottom up)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.16 * n + 1.2)))
    colors = ["tab:red" if acc[i] < 0.5 else "tab:orange" if acc[i] < 0.8 else "tab:green" for i in order]
    ax.barh(range(n), [acc[i] for i in order], color=colors, height=0.8)
    size = 9 if n <= 30 else 6 if n <= 100 else 4
    ax.set_yticks(range(n), [f"{names[i]} ({int(totals[i])})" for i in order], fontsize=size)
    overall = float(counts.diag().sum() / counts.sum().clamp(min=1))
    ax.axvline(overall, color="black", ls="--", lw=1, label=f"overall {overall:.4f}")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel("accuracy")
    ax.set_ylabel("class (images)")
    ax.set_title(f"{run}: {split} accuracy per class (worst first)".lstrip(": "))
    from matplotlib.patches import Patch
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], Patch(color="tab:green", label="80% or more"),
                       Patch(color="tab:orange", label="50% to 80%"), Patch(color="tab:red", label="under 50%")],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


@dataclass
class SampleSource:
    """What the sample grid needs: a model (eval mode is set here), its preprocessing, a split."""
    model: torch.nn.Module
    preprocess: object
    view: object
    device: torch.device


def stratified(view, count: int):
    """`count` samples of a split, taken from each class in turn (the first of every class, then the
    second, ...), in the split's order: a class-sorted image folder shows every class, not only class 0."""
    from distcls.data import SplitView

    if view.source.labels is None:  # labels known only once read (WebDataset shards): the split's first samples
        return view.truncated(count)
    labels = view.source.labels[view.indices].tolist()
    by_class: dict = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    chosen, depth = [], 0
    while len(chosen) < min(count, len(labels)):
        row = [positions[depth] for _, positions in sorted(by_class.items()) if depth < len(positions)]
        chosen += row[: count - len(chosen)]
        depth += 1
    return SplitView(view.source, view.indices[torch.tensor(sorted(chosen), dtype=torch.long)])


@torch.no_grad()
def plot_samples(src: SampleSource, names: Sequence[str], count: int, path, split: str = "test", run: str = "") -> Path:
    """`count` images of a split, every class in turn (stratified), with predicted / true labels (seed B's grid)."""
    from distcls.data import eval_loader

    plt = _pyplot()
    view = stratified(src.view, count)
    loader = eval_loader(view, len(view), 1, 0, torch.device("cpu"))
    batch = next(iter(loader))
    was_training = src.model.training
    src.model.eval()
    x = src.preprocess(batch.images.to(src.device), batch.keys.to(src.device), 0, train=False)
    pred = src.model(x).float().argmax(1).cpu()
    src.model.train(was_training)
    names = class_labels(names, max(len(names), int(pred.max()) + 1, int(batch.labels.max()) + 1))
    cols = min(8, len(pred))
    rows = -(-len(pred) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.75 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    wrong = 0
    for ax, img, p, t in zip(axes.flat, batch.images, pred.tolist(), batch.labels.tolist()):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
        ok = p == t
        wrong += not ok
        ax.set_title(
            f"{names[p]}" if ok else f"{names[p]}\n(true {names[t]})", fontsize=7, color="green" if ok else "red"
        )
        for spine in ax.spines.values():
            spine.set_edgecolor("green" if ok else "red")
            spine.set_linewidth(1 if ok else 3)
    # (shards: labels unknown until read)
    order = "every class in turn" if getattr(src.view.source, "labels", None) is not None else "the first ones"
    fig.suptitle(f"{run}: {split} images, {order}: predicted label (wrong ones in red, with the true label): "
                 f"{wrong} of {len(pred)} wrong".lstrip(": "), fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------------- all of a run's plots


def write_run_plots(out_dir, confusion: Optional[torch.Tensor], names: Sequence[str], samples: Optional[SampleSource],
                    count: int = 16) -> dict:
    """Every plot of a run into <out_dir>/plots/; returns {name: path}. The test-set pictures need
    the test confusion matrix (and a model for the sample grid); the curves need only metrics.jsonl."""
    import yaml
    from distcls.tracking.metrics import read_jsonl

    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    records = read_jsonl(out_dir / "metrics.jsonl")
    config = None
    if (out_dir / "config.yaml").is_file():
        config = yaml.safe_load((out_dir / "config.yaml").read_text())
    run = out_dir.resolve().name  # the run's name in every title
    written = {
        CURVES: plot_curves(records, plots / "curves.png", run),
        LR: plot_lr(records, config, plots / "lr.png", run),
    }
    if confusion is not None:
        written[CONFUSION] = plot_confusion(confusion, names, plots / "confusion.png", run=run)
        written[PER_CLASS] = plot_per_class(confusion, names, plots / "per_class.png", run=run)
    if samples is not None and count > 0:
        written[SAMPLES] = plot_samples(samples, names, count, plots / "samples.png", run=run)
    return written
