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
from distcls.data.fetch import download_with_torchvision
from distcls.data.registry import register_dataset
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
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(f"{path} is not a valid CIFAR batch file ({exc}); replace it with the official file") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_batches(files: list, label_key: str) -> TensorSource:
    images, labels = [], []
    for path in files:
        d = _read_pickle(path)
        if "data" not in d or label_key not in d:
            raise UserError(f"{path} lacks the '{'data' if 'data' not in d else label_key}' entry of the official CIFAR format")
        images.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    return TensorSource(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _require(folder: Path, names: list, cfg: DataConfig, dataset: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and cfg.download:
        download_with_torchvision(dataset, cfg.root)
        missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(
            f"{dataset} not found: {folder} lacks {', '.join(missing)}; put the official python-version files "
            f"there (the extracted archive's folder '{folder.name}' goes inside data.root={cfg.root}) or set data.download=true")


@register_dataset("cifar10")
def build_cifar10(cfg: DataConfig) -> RawDataset:
    folder = Path(cfg.root) / "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    _require(folder, train_files + ["test_batch"], cfg, "cifar10")
    meta = folder / "batches.meta"
    names = [str(n) for n in _read_pickle(meta)["label_names"]] if meta.is_file() else [str(i) for i in range(10)]
    return RawDataset(train=_read_batches([folder / f for f in train_files], "labels"),
                      test=_read_batches([folder / "test_batch"], "labels"), class_names=names,
                      mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


@register_dataset("cifar100")
def build_cifar100(cfg: DataConfig) -> RawDataset:
    folder = Path(cfg.root) / "cifar-100-python"
    _require(folder, ["train", "test"], cfg, "cifar100")
    meta = folder / "meta"
    names = [str(n) for n in _read_pickle(meta)["fine_label_names"]] if meta.is_file() else [str(i) for i in range(100)]
    return RawDataset(train=_read_batches([folder / "train"], "fine_labels"),
                      test=_read_batches([folder / "test"], "fine_labels"), class_names=names,
                      mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
