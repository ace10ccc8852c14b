"""Batches for the engine: (uint8 images on device, labels, sample keys), per rank.

In-memory sources are indexed directly (optionally kept on the device); file sources stream
through DataLoader workers. Both follow the sampler contract in `sampler.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from distcls.data.sampler import EvalShardSampler, GlobalBatchSampler
from distcls.data.sources import SplitView


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, C, H, W] on device
    labels: torch.Tensor  # int64 [B] on device
    keys: torch.Tensor  # int64 [B] dataset indices: the augmentation key


class _ViewDataset(torch.utils.data.Dataset):
    def __init__(self, view: SplitView):
        self.view = view

    def __len__(self):
        return len(self.view)

    def __getitem__(self, pos):
        return self.view.source[int(self.view.indices[pos])]


class BatchLoader:
    """Iterates this rank's batches of one split; `sampler` decides which positions."""

    def __init__(self, view: SplitView, sampler, device: torch.device, num_workers: int = 0):
        self.view, self.sampler, self.device = view, sampler, device
        self.num_workers = num_workers
        if not view.source.streaming:
            src = view.source
            self._images = src.images[view.indices].to(device)
            self._labels = src.labels[view.indices].to(device)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        if not self.view.source.streaming:
            for positions in self.sampler:
                pos = torch.tensor(positions, dtype=torch.long)
                on_dev = pos.to(self.device)
                yield Batch(self._images[on_dev], self._labels[on_dev], self.view.indices[pos])
            return
        loader = DataLoader(_ViewDataset(self.view), batch_sampler=list(self.sampler), num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for images, labels, keys in loader:
            yield Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), keys)


def train_loader(view: SplitView, global_batch: int, world_size: int, rank: int, seed: int, device,
                 num_workers: int = 0, max_steps=None) -> BatchLoader:
    sampler = GlobalBatchSampler(len(view), global_batch, world_size, rank, seed, shuffle=True, max_steps=max_steps)
    return BatchLoader(view, sampler, device, num_workers)


def eval_loader(view: SplitView, global_batch: int, world_size: int, rank: int, device, num_workers: int = 0) -> BatchLoader:
    sampler = EvalShardSampler(len(view), max(1, global_batch // world_size), world_size, rank)
    return BatchLoader(view, sampler, device, num_workers)
