"""A generated, learnable dataset: each class is a fixed random pattern plus noise.

Handy for benchmarks and smoke tests at any image size; the same files every run (seeded by
the dataset's own constant, not by run.seed).
"""
from __future__ import annotations

import torch

from distcls.config import DataConfig
from distcls.data.datasets.registry import register_dataset
from distcls.data.sources import RawDataset, TensorSource


def _make(n: int, s, gen: torch.Generator, prototypes: torch.Tensor) -> TensorSource:
    labels = torch.randint(0, s.num_classes, (n,), generator=gen)
    noise = torch.randn((n, s.channels, s.size, s.size), generator=gen) * 40
    images = (prototypes[labels] + noise).clamp_(0, 255).round_().to(torch.uint8)
    return TensorSource(images, labels)


@register_dataset("synthetic")
def build_synthetic(cfg: DataConfig) -> RawDataset:
    s = cfg.synthetic
    gen = torch.Generator().manual_seed(20240917)
    prototypes = torch.rand((s.num_classes, s.channels, s.size, s.size), generator=gen) * 255
    train = _make(s.train_samples, s, gen, prototypes)
    test = _make(s.test_samples, s, gen, prototypes)
    return RawDataset(train=train, test=test, class_names=[f"class_{i}" for i in range(s.num_classes)],
                      mean=(0.5,) * s.channels, std=(0.25,) * s.channels)
