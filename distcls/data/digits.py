"""scikit-learn's 1,797 real 8x8 handwritten digits: ships with the package, works offline."""
from __future__ import annotations

import torch

from distcls.config import DataConfig
from distcls.data.registry import register_dataset
from distcls.data.sources import RawDataset, TensorSource


@register_dataset("digits")
def build_digits(cfg: DataConfig) -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images).float()  # values 0..16
    images = (pixels * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    # No official test split: data.split (default [0.9 - val_fraction, val_fraction, 0.1]) carves train/val/test.
    return RawDataset(train=TensorSource(images, labels), test=None,
                      class_names=[str(i) for i in range(10)], mean=(0.3050,), std=(0.3748,))
