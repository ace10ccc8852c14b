"""Which samples of a set of WebDataset shards each rank reads, step by step (arithmetic only: the
reading is shard_source.py's).

Training, epoch e, keyed by (seed, e) and independent of the world size:
1. the shards are shuffled and their samples laid end to end: one sequence of the N samples;
2. the sequence is cut into K equal contiguous STREAMS (K = data.shard_streams; L = N // K samples
   each, the last N mod K samples of the epoch dropped): a stream reads whole shards one after the
   other, only its first and last one in part;
3. a stream's samples are shuffled within consecutive windows of data.shuffle_window samples
   (keyed by (seed, e, stream, window)): the window is read, then given out in its shuffled order;
4. global batch s holds, for k = 0..K-1 in turn, stream k's outputs s*c .. (s+1)*c - 1, where
   c = data.batch_size / K. An epoch has L // c steps.
Rank r of W (W divides K) reads streams r*K/W .. (r+1)*K/W - 1: its part of each global batch is
the r-th contiguous slice, as the sampler contract says (sampler.py), so 1 and W ranks train on the
same global batches. Each stream reads its shards sequentially: no random access into a tar, which
remote storage cannot serve at speed. Resuming at step s reads again from the start of the window
that holds output s*c; the shards before it are not opened.

A sample's key (the augmentation key, keys.py) is its place in the shards' own order: the samples
of the shards before its shard, plus its place in its shard. Evaluation reads that order, rank r a
contiguous range (sizes differ by at most one): every sample once at any world size.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from distcls.config import check_batch_split
from distcls.data.transforms.keys import keyed_seed
from distcls.errors import ConfigError


@dataclass(frozen=True)
class ShardSet:
    urls: tuple  # each shard's path or URL, in the pattern's order
    counts: tuple  # each shard's number of samples

    def __post_init__(self):
        if len(self.urls) != len(self.counts):
            raise ValueError(f"{len(self.urls)} shards but {len(self.counts)} counts")

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """The key of each shard's first sample (the samples of the shards before it)."""
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)[:-1]]).astype(np.int64)

    def prefix(self, n: int) -> "ShardSet":
        """The first n samples in the shards' order (data.max_train_samples / max_eval_samples)."""
        if n >= self.total:
            return self
        urls, counts, left = [], [], n
        for url, count in zip(self.urls, self.counts):
            if left <= 0:
                break
            urls.append(url)
            counts.append(min(count, left))
            left -= count
        return ShardSet(tuple(urls), tuple(counts))


def runs_of(order: Sequence[int], counts: Sequence[int], lo: int, hi: int) -> list:
    """The samples at places lo..hi-1 of the shards `order` laid end to end, as runs (shard, first,
    count): `count` samples of shard number `shard` from its sample `first` on."""
    runs, start = [], 0
    for shard in order:
        n = int(counts[shard])
        if start + n > lo and start < hi:
            first = max(lo, start) - start
            runs.append((int(shard), first, min(hi, start + n) - start - first))
        start += n
        if start >= hi:
            break
    return runs


def keyed_permutation(n: int, *parts: int) -> np.ndarray:
    """A permutation of n keyed by integers (the seed, the epoch, ...): the same on every machine and
    rank (keys.keyed_seed: no two tuples share a seed by arithmetic)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(keyed_seed(*parts))).numpy()


@dataclass(frozen=True)
class Window:
    """One window of a stream: its runs (read in order), the order its samples are given out in
    (`order[i]`: a place in the window), and how many of those to skip (a resume inside it)."""
    runs: list
    order: np.ndarray
    skip: int = 0


class TrainPlan:
    """The training order of a ShardSet (module docstring); `set_epoch` / `steps_per_epoch` as
    sampler.GlobalBatchSampler's, so the trainer drives both alike."""

    SALT_SHARDS, SALT_WINDOWS = 11, 13

    def __init__(
        self,
        shards: ShardSet,
        streams: int,
        window: int,
        global_batch: int,
        world_size: int,
        rank: int,
        seed: int,
        max_steps=None,
    ):
        check_batch_split(global_batch, world_size)
        if streams % world_size:
            raise ConfigError(
                f"data.shard_streams={streams} must be a multiple of the world size {world_size} (each rank reads "
                f"shard_streams / world size streams); set data.shard_streams to a multiple of {world_size}, e.g. "
                f"{streams * world_size // np.gcd(streams, world_size)}, and keep it when the world size changes"
            )
        if global_batch % streams:
            raise ConfigError(
                f"data.batch_size={global_batch} must be a multiple of data.shard_streams={streams} (each global batch "
                f"takes batch_size / shard_streams samples from every stream); change one of them"
            )
        self.shards, self.streams, self.window = shards, streams, window
        self.global_batch, self.world_size, self.rank, self.seed = global_batch, world_size, rank, seed
        self.per_stream = global_batch // streams
        self.stream_len = shards.total // streams
        full = self.stream_len // self.per_stream
        if full == 0:
            raise ConfigError(
                f"the training shards hold {shards.total} samples, fewer than one global batch (data.batch_size="
                f"{global_batch}) in whole streams ({streams} streams of {self.stream_len}); lower data.batch_size "
                "or data.shard_streams"
            )
        self.steps_per_epoch = min(full, max_steps) if max_steps else full
        self.epoch, self.start_step = 0, 0

    # -- the sampler's interface
    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    @property
    def my_streams(self) -> list:
        share = self.streams // self.world_size
        return list(range(self.rank * share, (self.rank + 1) * share))

    # -- the order
    def shard_order(self, epoch: int) -> np.ndarray:
        return keyed_permutation(len(self.shards.counts), self.seed, epoch, self.SALT_SHARDS)

    def windows(self, epoch: int, stream: int, start_step: int = 0) -> Iterator[Window]:
        """Stream `stream`'s windows from the one holding step `start_step`'s first output to the
        epoch's last step, each with the order its samples are given out in."""
        order = self.shard_order(epoch)
        first_out, end_out = start_step * self.per_stream, self.steps_per_epoch * self.per_stream
        base = stream * self.stream_len
        w = first_out // self.window
        while w * self.window < end_out:
            lo, hi = w * self.window, min((w + 1) * self.window, self.stream_len)
            perm = keyed_permutation(hi - lo, self.seed, epoch, self.SALT_WINDOWS, stream, w)
            # the window's places past the epoch's end (train.max_steps_per_epoch) are read but never given out
            needed = min(hi, end_out) - lo
            yield Window(
                runs_of(order, self.shards.counts, base + lo, base + hi), perm[:needed], max(0, first_out - lo)
            )
            w += 1


def eval_range(total: int, world_size: int, rank: int) -> tuple:
    """Rank `rank`'s contiguous range [start, stop) of `total` samples (sizes differ by at most one)."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
