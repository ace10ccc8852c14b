"""Plots (matplotlib, Agg backend): confusion matrix and sample grid for `distcls.evaluate`."""
from __future__ import annotations

import io
import os
from pathlib import Path

from distcls.io import atomic_write_bytes


def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_confusion(confusion, names: list, path) -> None:
    plt = _pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 2)))
    ax.imshow(confusion.numpy(), cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    _save(fig, path)
    plt.close(fig)


def plot_samples(restored, view, names: list, count: int, path) -> None:
    """A grid of the first `count` images of a split with predicted vs true labels (seed B)."""
    import torch
    from distcls.data import eval_loader

    plt = _pyplot()
    loader = eval_loader(view.truncated(count), count, 1, 0, torch.device("cpu"))
    batch = next(iter(loader))
    device = next(restored.model.parameters()).device
    with torch.no_grad():
        x = restored.preprocess(batch.images.to(device), batch.keys, 0, train=False)
        pred = restored.model(x).argmax(1).cpu()
    cols = min(8, len(pred))
    rows = -(-len(pred) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, p, t in zip(axes.flat, batch.images, pred.tolist(), batch.labels.tolist()):
        ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
        ax.set_title(f"{names[p]}\n(true {names[t]})", fontsize=7, color="green" if p == t else "red")
    _save(fig, Path(path))
    plt.close(fig)
