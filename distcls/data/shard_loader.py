"""Batches of WebDataset shards for the engine, per rank: the same `Batch`es, interface and bad-sample
rules as loader.BatchLoader, in the order shard_plan.py lays out.

DataLoader workers (data.num_workers) divide this rank's streams among them in contiguous blocks
(training) or its evaluation range (evaluation); each reads its shards sequentially, decodes, crops
and collates, and hands the main process its part of each batch, which it joins in worker order (the
order without workers). A worker yields one item per step, so the DataLoader's round robin over the
workers stays in step. The workers are started for
each epoch and each evaluation (an iterable dataset takes its epoch and resume step when started).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distcls.data.batch import Batch, collate_decoded
from distcls.data.shard_plan import TrainPlan, eval_range, runs_of
from distcls.data.shard_source import ShardReader, ShardSource
from distcls.data.sources import SplitView
from distcls.errors import UserError


def _as_is(item):
    """The DataLoader's collate: a worker's item is already what the main process puts together."""
    return item


def worker_block(items: list, info=None) -> list:
    """This DataLoader worker's contiguous block of `items` (all of them without workers; blocks differ by
    at most one): the parts of the workers, put together in worker order, are `items` in order."""
    info = info if info is not None else get_worker_info()
    if info is None:
        return items
    base, extra = divmod(len(items), info.num_workers)
    start = info.id * base + min(info.id, extra)
    return items[start:start + base + (1 if info.id < extra else 0)]


def stream_outputs(plan: TrainPlan, reader: ShardReader, stream: int, epoch: int, start_step: int) -> Iterator[tuple]:
    """Stream `stream`'s raw samples (sample, message, key) in its shuffled order from step `start_step`'s first
    output."""
    for window in plan.windows(epoch, stream, start_step):
        raw = [item for run in window.runs for item in reader.read(run)]
        for place in window.order[window.skip:]:
            yield raw[place]
        del raw  # one window in memory at a time, not two


class _TrainSteps(IterableDataset):
    """One item per step from `start_step` on: the collated samples (batch.collate_decoded) of this
    worker's block of the rank's streams, in stream order."""

    def __init__(self, source: ShardSource, plan: TrainPlan, epoch: int, start_step: int, seed: int):
        self.source, self.plan, self.epoch, self.start_step, self.seed = source, plan, epoch, start_step, seed

    def __iter__(self):
        streams = worker_block(self.plan.my_streams)
        readers = {k: ShardReader(self.source.shards) for k in streams}
        outputs = {k: stream_outputs(self.plan, readers[k], k, self.epoch, self.start_step) for k in streams}
        try:
            for _ in range(self.start_step, self.plan.steps_per_epoch):
                yield collate_decoded([self.source.decode(next(outputs[k]), True, self.seed, self.epoch)
                                       for k in streams for _ in range(self.plan.per_stream)])
        finally:
            for reader in readers.values():
                reader.close()


class _EvalBatches(IterableDataset):
    """This worker's evaluation batches, collated: a contiguous block of the rank's range, read in the shards' order."""

    def __init__(self, source: ShardSource, start: int, stop: int, local_batch: int):
        self.source, self.start, self.stop, self.local_batch = source, start, stop, local_batch

    def __iter__(self):
        batches = worker_block(
            [(lo, min(lo + self.local_batch, self.stop)) for lo in range(self.start, self.stop, self.local_batch)]
        )
        reader = ShardReader(self.source.shards)
        order = range(len(self.source.shards.counts))
        try:
            for lo, hi in batches:
                raw = [item for run in runs_of(order, self.source.shards.counts, lo, hi) for item in reader.read(run)]
                yield collate_decoded([self.source.decode(item, False, 0, 0) for item in raw])
        finally:
            reader.close()


class _EvalOrder:
    """The evaluation's `sampler`: its number of batches (the trainer's interface)."""

    def __init__(self, start: int, stop: int, local_batch: int):
        self.start, self.stop, self.local_batch = start, stop, local_batch
        self.epoch = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.local_batch)


class ShardBatchLoader:
    """Iterates this rank's batches of one split of shards (training: TrainPlan's order; evaluation:
    the shards' order, this rank's range). A bad sample is an error naming it, or (source.skip_bad)
    dropped from its batch and listed in `dropped`."""

    def __init__(self, view: SplitView, device: torch.device, num_workers: int, prefetch_factor: int, seed: int,
                 plan: TrainPlan = None, eval_batch: int = 1, world_size: int = 1, rank: int = 0):
        self.view, self.device, self.seed = view, device, seed
        self.source: ShardSource = view.source
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.train = plan is not None
        # imported here, once: DataLoader workers (forked) inherit them instead of importing each (about 3 s)
        from webdataset import tariterators  # noqa: F401
        from distcls.data.transforms import images  # noqa: F401
        self.dropped: list[str] = []
        if plan is not None:
            self.sampler = plan
        else:
            start, stop = eval_range(len(view), world_size, rank)
            self.sampler = _EvalOrder(start, stop, max(1, eval_batch))

    def __len__(self) -> int:
        return len(self.sampler)

    def _items(self, dataset: IterableDataset, parts: int):
        workers = min(self.num_workers, parts)
        extra = {"prefetch_factor": self.prefetch_factor} if workers > 0 else {}
        return DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                          pin_memory=self.device.type == "cuda", **extra)

    def _check(self, images, labels, keys, bad):
        """The Batch on the device; None for an evaluation batch whose samples are all bad (skipped)."""
        if bad:
            if not self.source.skip_bad:
                raise UserError(
                    f"{bad[0]}; fix or remove the sample (or the shard), or set data.skip_bad_images=true to skip such "
                    "samples"
                )
            self.dropped.extend(bad)
            if images is None and self.train:  # every rank takes part in every step: this one has nothing to train on
                raise UserError(
                    f"every sample of this rank's part of a training batch is unreadable ({bad[0]}, ...): a missing or "
                    "cut shard, which data.skip_bad_images=true cannot leave out (it skips single samples); fix or "
                    "replace it"
                )
            if images is None:
                return None
        return Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                     keys.to(self.device, non_blocking=True))

    def __iter__(self) -> Iterator[Batch]:
        if not self.train:
            yield from self._evaluation()
            return
        plan = self.sampler
        workers = max(1, min(self.num_workers, len(plan.my_streams)))
        items = iter(
            self._items(_TrainSteps(self.source, plan, plan.epoch, plan.start_step, self.seed), len(plan.my_streams))
        )
        for _ in range(plan.start_step, plan.steps_per_epoch):
            # one item per worker per step, in worker order
            yield self._check(*_joined([next(items) for _ in range(workers)]))

    def _evaluation(self) -> Iterator[Batch]:
        order = self.sampler
        if order.stop <= order.start:
            return
        for collated in self._items(_EvalBatches(self.source, order.start, order.stop, order.local_batch), len(order)):
            batch = self._check(*collated)
            if batch is not None:  # (sums are reduced at the end: a rank may skip a batch)
                yield batch


def _joined(parts: list) -> tuple:
    """Collated parts of one batch (the workers') -> one (images, labels, keys, bad), in the parts' order."""
    if len(parts) == 1:
        return parts[0]
    good = [p for p in parts if p[0] is not None]
    bad = [b for p in parts for b in p[3]]
    if not good:
        return None, None, None, bad
    return (*(torch.cat([p[i] for p in good]) for i in range(3)), bad)
