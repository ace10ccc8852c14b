"""Seeded train/val/test splits, the same on every rank and at every world size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distcls.config import DataConfig
from distcls.data.sources import RawDataset, SplitView
from distcls.errors import ConfigError


NO_TEST_SPLIT_TRAIN = 0.9  # without an official test split, 10% of the data (seeded) is the test split


@dataclass
class Splits:
    train: SplitView
    val: Optional[SplitView]
    test: SplitView


def _perm(n: int, seed: int, salt: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + salt))


def make_splits(dataset: RawDataset, cfg: DataConfig, seed: int) -> Splits:
    if cfg.split is not None or dataset.test is None:
        # Pool every official split and re-split: data.split, or [0.9 - v, v, 0.1] when there is no test set.
        pooled, seen = dataset.train, [dataset.train]
        for extra in (dataset.val, dataset.test):
            # one source in two roles (val/ of an image folder) pools once
            if extra is not None and not any(extra is s for s in seen):
                pooled = pooled.concat(extra)
                seen.append(extra)
        fractions = cfg.split or [NO_TEST_SPLIT_TRAIN - cfg.val_fraction, cfg.val_fraction, 1 - NO_TEST_SPLIT_TRAIN]
        n = len(pooled)
        order = _perm(n, seed, 1)
        n_val, n_test = int(round(fractions[1] * n)), int(round(fractions[2] * n))
        n_train = n - n_val - n_test
        train = SplitView(pooled, order[:n_train].sort().values)
        val = SplitView(pooled, order[n_train:n_train + n_val].sort().values) if n_val else None
        test = SplitView(pooled, order[n_train + n_val:].sort().values)
    else:
        test = SplitView(dataset.test, torch.arange(len(dataset.test)))
        if dataset.val is not None:
            train = SplitView(dataset.train, torch.arange(len(dataset.train)))
            val = SplitView(dataset.val, torch.arange(len(dataset.val)))
        else:
            n = len(dataset.train)
            n_val = int(round(cfg.val_fraction * n))
            order = _perm(n, seed, 2)
            train = SplitView(dataset.train, order[n_val:].sort().values)
            val = SplitView(dataset.train, order[:n_val].sort().values) if n_val else None
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(
            f"the split leaves {len(train)} training and {len(test)} test samples; change data.split / "
            "data.val_fraction"
        )
    return Splits(train.truncated(cfg.max_train_samples),
                  val.truncated(cfg.max_eval_samples) if val is not None else None,
                  test.truncated(cfg.max_eval_samples))
