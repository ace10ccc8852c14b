"""MNIST and Fashion-MNIST in the official IDX format, in torchvision's layout.

    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <root>/FashionMNIST/raw/...  (same file names)
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from distcls.config import DataConfig
from distcls.data.datasets.fetch import download_with_torchvision
from distcls.data.datasets.registry import register_dataset
from distcls.data.sources import RawDataset, TensorSource
from distcls.errors import UserError

_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes: magic 0x0000 08 <ndim>, big-endian dims, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; a cut .gz raises EOFError
        raise UserError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}); it is truncated or corrupt: replace it with the "
            "official file"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(
            f"{path} is not an IDX file of unsigned bytes (bad magic number); replace it with the official file"
        )
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(
            f"{path} is truncated: its header announces {ndim} dimensions but the file ends after {len(raw)} bytes; "
            "replace it with the official file"
        )
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, file holds {data.size} bytes of data")
    return data.reshape(dims)


def _find(raw_dir: Path, name: str):
    for candidate in (raw_dir / name, raw_dir / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _build(cfg: DataConfig, dataset: str, folder: str, classes, mean, std) -> RawDataset:
    raw_dir = Path(cfg.root) / folder / "raw"
    names = [n for pair in _FILES.values() for n in pair]
    if any(_find(raw_dir, n) is None for n in names) and cfg.download:
        download_with_torchvision(dataset, cfg.root)
    missing = [n for n in names if _find(raw_dir, n) is None]
    if missing:
        raise UserError(
            f"{dataset} not found: {raw_dir} lacks {', '.join(missing)} (or .gz); put the official IDX files there or "
            "set data.download=true"
        )
    splits = {}
    for split, (img_name, lbl_name) in _FILES.items():
        images = read_idx(_find(raw_dir, img_name))
        labels = read_idx(_find(raw_dir, lbl_name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{raw_dir}: {img_name} holds {images.shape} but {lbl_name} holds {labels.shape}; they must be N "
                "images and N labels"
            )
        if labels.size and labels.max() >= len(classes):
            raise UserError(
                f"{_find(raw_dir, lbl_name)} holds label {int(labels.max())}, but {dataset} has {len(classes)} classes "
                f"(0..{len(classes) - 1}); replace it with the official file"
            )
        splits[split] = TensorSource(
            torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
        )
    return RawDataset(train=splits["train"], test=splits["test"], class_names=classes, mean=mean, std=std)


@register_dataset("mnist")
def build_mnist(cfg: DataConfig) -> RawDataset:
    return _build(cfg, "mnist", "MNIST", [str(i) for i in range(10)], (0.1307,), (0.3081,))


@register_dataset("fashion_mnist")
def build_fashion_mnist(cfg: DataConfig) -> RawDataset:
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return _build(cfg, "fashion_mnist", "FashionMNIST", classes, (0.2860,), (0.3530,))
