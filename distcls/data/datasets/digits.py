"""scikit-learn's 1,797 real 8x8 handwritten digits: ships with the package, works offline.

The CSV that scikit-learn bundles is read directly (the same numbers `load_digits` returns) so a
run does not pay the ~0.7 s import of scikit-learn; `load_digits` is the fallback.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from distcls.config import DataConfig
from distcls.data.datasets.registry import register_dataset
from distcls.data.sources import RawDataset, TensorSource
from distcls.errors import UserError


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images float [1797, 8, 8] with values 0..16, labels int [1797]) without importing sklearn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise UserError("data.name=digits needs scikit-learn (it bundles the digits); pip install scikit-learn")
    csv = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@register_dataset("digits")
def build_digits(cfg: DataConfig) -> RawDataset:
    images_0_16, target = _digits_arrays()
    pixels = torch.from_numpy(images_0_16).float()  # values 0..16
    images = (pixels * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(target).long()
    # No official test split: data.split (default [0.9 - val_fraction, val_fraction, 0.1]) carves train/val/test.
    return RawDataset(train=TensorSource(images, labels), test=None,
                      class_names=[str(i) for i in range(10)], mean=(0.3050,), std=(0.3748,))
