"""CIFAR-10/100 in the official "python version" layout (what torchvision downloads).

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <root>/cifar-100-python/{train, test, meta}

The batch files are pickles of numpy arrays. They are read with an unpickler that only admits
the few numpy reconstructors those files need, so a tampered file cannot run code.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from distcls.config import DataConfig
from distcls.data.datasets.fetch import download_with_torchvision
from distcls.data.datasets.registry import register_dataset
from distcls.data.sources import RawDataset, TensorSource
from distcls.errors import UserError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    # a damaged pickle raises many types (EOFError, KeyError, IndexError, ...): all mean "not valid"
    except Exception as exc:
        raise UserError(
            f"{path} is not a valid CIFAR batch file ({type(exc).__name__}: {str(exc)[:200]}); replace it with the "
            "official file"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(
            f"{path} is not a valid CIFAR batch file (it holds a {type(obj).__name__}, not a dict); replace it with "
            "the official file"
        )
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _class_names(meta: Path, key: str, n: int) -> list:
    if not meta.is_file():
        return [str(i) for i in range(n)]
    names = _read_pickle(meta).get(key)
    if not isinstance(names, (list, tuple)) or len(names) != n:
        raise UserError(
            f"{meta} lacks a list of {n} '{key}' of the official CIFAR format; replace it with the official file (or "
            "remove it)"
        )
    return [str(name) for name in names]


_IMAGE_BYTES = 3 * 32 * 32


def _read_batches(files: list, label_key: str, num_classes: int) -> TensorSource:
    images, labels = [], []
    for path in files:
        d = _read_pickle(path)
        if "data" not in d or label_key not in d:
            raise UserError(
                f"{path} lacks the '{'data' if 'data' not in d else label_key}' entry of the official CIFAR format"
            )
        try:
            data = np.asarray(d["data"], dtype=np.uint8)
            lbl = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UserError(
                f"{path} holds data or labels that are not arrays of integers ({exc}); replace it with the official "
                "file"
            ) from None
        if data.size % _IMAGE_BYTES:
            raise UserError(
                f"{path} holds {data.size} bytes of image data, not a multiple of 3x32x32 = {_IMAGE_BYTES}; replace it "
                "with the official file"
            )
        data = data.reshape(-1, 3, 32, 32)
        if len(data) != len(lbl):
            raise UserError(f"{path} holds {len(data)} images but {len(lbl)} labels; replace it with the official file")
        if lbl.size and (lbl.min() < 0 or lbl.max() >= num_classes):
            bad = int(lbl.min()) if lbl.min() < 0 else int(lbl.max())
            raise UserError(
                f"{path} holds label {bad}, but the dataset has {num_classes} classes (0..{num_classes - 1}); replace "
                "it with the official file"
            )
        images.append(data)
        labels.append(lbl)
    return TensorSource(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _require(folder: Path, names: list, cfg: DataConfig, dataset: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and cfg.download:
        download_with_torchvision(dataset, cfg.root)
        missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(
            f"{dataset} not found: {folder} lacks {', '.join(missing)}; put the official python-version files "
            f"there (the extracted archive's folder '{folder.name}' goes inside data.root={cfg.root}) or set "
            "data.download=true"
        )


@register_dataset("cifar10")
def build_cifar10(cfg: DataConfig) -> RawDataset:
    folder = Path(cfg.root) / "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    _require(folder, train_files + ["test_batch"], cfg, "cifar10")
    meta = folder / "batches.meta"
    names = _class_names(meta, "label_names", 10)
    return RawDataset(train=_read_batches([folder / f for f in train_files], "labels", len(names)),
                      test=_read_batches([folder / "test_batch"], "labels", len(names)), class_names=names,
                      mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


@register_dataset("cifar100")
def build_cifar100(cfg: DataConfig) -> RawDataset:
    folder = Path(cfg.root) / "cifar-100-python"
    _require(folder, ["train", "test"], cfg, "cifar100")
    meta = folder / "meta"
    names = _class_names(meta, "fine_label_names", 100)
    return RawDataset(train=_read_batches([folder / "train"], "fine_labels", len(names)),
                      test=_read_batches([folder / "test"], "fine_labels", len(names)), class_names=names,
                      mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
