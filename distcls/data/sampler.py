"""The sampler contract: which samples each rank sees, independent of the world size.

Training: epoch e shuffles all N positions with a generator seeded by (seed, e) and cuts the
permutation into GLOBAL batches of `global_batch`; the last partial batch is dropped. Rank r of
W takes the r-th of W equal, contiguous slices of every global batch. So 1 process and W
processes see the same global batches in the same order, and step s of epoch e is the same
samples whoever computes it. `start_step` resumes inside an epoch at the exact next batch.

Repeated augmentation (`repeats` = k > 1, torchvision's RASampler / --ra-reps): each global
batch is G/k distinct samples (the next ones of the permutation) laid out k times,
[s1..sm, s1..sm, ...]; copy j of a sample is emitted as position p + j * N, so its augmentation
key differs per copy (the loader decodes p = position % N, j = position // N). Copies sit G/k
apart in the global batch, hence on different ranks whenever the world size is at least k (and
spread evenly below that), and the global order does not depend on the world size. An epoch
keeps N // G steps (as torchvision's RASampler keeps the epoch's length): about N / k distinct
samples per epoch, each k times.

Evaluation: every position exactly once, no padding. Rank r takes a contiguous shard (sizes
differ by at most one); callers reduce SUMS across ranks, never means.
"""
from __future__ import annotations

from typing import Iterator

import torch

from distcls.config import check_batch_split
from distcls.errors import ConfigError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


class GlobalBatchSampler:
    """Yields this rank's slice (a list of positions) of each global batch of an epoch."""

    def __init__(self, num_samples: int, global_batch: int, world_size: int, rank: int,
                 seed: int, shuffle: bool = True, max_steps: int | None = None, repeats: int = 1):
        check_batch_split(global_batch, world_size)
        if global_batch % repeats:
            raise ConfigError(
                f"data.repeats={repeats} lays out each global batch as data.batch_size/repeats distinct samples "
                f"repeated; data.batch_size={global_batch} must be a multiple of {repeats}"
            )
        self.repeats = repeats
        if num_samples < global_batch:
            raise ConfigError(
                f"the training split has {num_samples} samples, fewer than one global batch "
                f"(data.batch_size={global_batch}); lower data.batch_size")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.world_size, self.rank = world_size, rank
        self.local_batch = global_batch // world_size
        self.seed, self.shuffle = seed, shuffle
        full = num_samples // global_batch
        self.steps_per_epoch = min(full, max_steps) if max_steps else full
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def _order(self) -> torch.Tensor:
        return (
            epoch_permutation(self.num_samples, self.seed, self.epoch)
            if self.shuffle
            else torch.arange(self.num_samples)
        )

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        lo = self.rank * self.local_batch
        distinct = self.global_batch // self.repeats
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * distinct:(step + 1) * distinct]
            if self.repeats > 1:
                batch = torch.cat([batch + copy * self.num_samples for copy in range(self.repeats)])
            yield batch[lo:lo + self.local_batch].tolist()


class EvalShardSampler:
    """Rank r's contiguous shard of 0..N-1 in batches of at most `local_batch`; no padding."""

    def __init__(self, num_samples: int, local_batch: int, world_size: int, rank: int):
        base, extra = divmod(num_samples, world_size)
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (1 if rank < extra else 0)
        self.local_batch = max(1, local_batch)

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.local_batch)

    def __iter__(self) -> Iterator[list[int]]:
        for lo in range(self.start, self.stop, self.local_batch):
            yield list(range(lo, min(lo + self.local_batch, self.stop)))
