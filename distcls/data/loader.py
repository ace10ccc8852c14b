"""Batches for the engine: (uint8 images on device, labels, sample keys), per rank.

In-memory sources are indexed directly (optionally kept on the device); file sources stream
through DataLoader workers. Both follow the sampler contract in `sampler.py`.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from distcls.runtime.copies import host_to_device
from distcls.data.batch import Batch, collate_decoded
from distcls.data.sampler import EvalShardSampler, GlobalBatchSampler
from distcls.data.sources import SplitView
from distcls.errors import UserError


def _gpu_decode_module():
    """data.gpu_decode's module (torchvision.io), imported only when it is used."""
    from distcls.data.transforms import gpu_decode
    return gpu_decode


class _EpochBatches:
    """The sampler's batches as [(position, epoch), ...]: the epoch travels with each index, so
    persistent workers (created once) still key their random crops by the current epoch."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)
        for positions in self.sampler:
            yield [(p, epoch) for p in positions]


class _FileViewDataset(torch.utils.data.Dataset):
    """Runs in the DataLoader workers: decode + crop + resize one file (never raises for a bad file)."""

    def __init__(self, view: SplitView, train: bool, seed: int, gpu_decode: bool = False):
        self.view, self.train, self.seed, self.gpu_decode = view, train, seed, gpu_decode

    def __len__(self):
        return len(self.view)

    def __getitem__(self, item):
        pos, epoch = item
        copy, pos = divmod(pos, len(self.view))  # repeated augmentation: copy j of position pos (sampler.py)
        index = int(self.view.indices[pos])
        if self.gpu_decode:
            return _gpu_decode_module().read_item(self.view.source, index, self.train, self.seed, epoch)
        return self.view.source.load(index, self.train, self.seed, epoch, key=index + copy * len(self.view.source))


class BatchLoader:
    """Iterates this rank's batches of one split; `sampler` decides which positions.

    File sources stream through ONE DataLoader per split, created on first use: persistent
    workers, `prefetch_factor` batches ahead per worker, pinned memory for CUDA. Workers return
    uint8 images; normalization and the remaining augmentation run batched on the device.
    A file that fails to decode is an error naming it, or (source.skip_bad) dropped from its
    batch and listed in `dropped`.
    """

    def __init__(self, view: SplitView, sampler, device: torch.device, num_workers: int = 0, train: bool = False,
                 seed: int = 0, prefetch_factor: int = 4, gpu_decode: bool = False):
        self.view, self.sampler, self.device = view, sampler, device
        self.num_workers, self.train, self.seed, self.prefetch_factor = num_workers, train, seed, prefetch_factor
        if gpu_decode and (device.type != "cuda" or not view.source.decoded_on_demand):
            raise UserError("data.gpu_decode=true needs data.name=imagefolder and a CUDA training device "
                            f"(this run: {device.type}); set data.gpu_decode=false")
        self.gpu_decode = gpu_decode
        self.dropped: list[str] = []
        self._loader = None
        if not view.source.decoded_on_demand:
            src = view.source
            self._images = src.images[view.indices].to(device)
            self._labels = src.labels[view.indices].to(device)
            self._keys = view.indices.to(device)

    def __len__(self) -> int:
        return len(self.sampler)

    def _data_loader(self) -> DataLoader:
        if self._loader is None:
            workers = (
                {"persistent_workers": True, "prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
            )
            self._loader = DataLoader(_FileViewDataset(self.view, self.train, self.seed, self.gpu_decode),
                                      batch_sampler=_EpochBatches(self.sampler), num_workers=self.num_workers,
                                      collate_fn=_gpu_decode_module().collate if self.gpu_decode else collate_decoded,
                                      pin_memory=self.device.type == "cuda" and not self.gpu_decode, **workers)
        return self._loader

    def _batches(self):
        if not self.gpu_decode:
            yield from self._data_loader()
            return
        epoch = getattr(self.sampler, "epoch", 0)
        for items in self._data_loader():
            yield _gpu_decode_module().assemble(items, self.view.source, self.train, self.seed, epoch, self.device)

    def _epoch_positions(self) -> list:
        """The sampler's batches of this epoch as device tensors: ONE non-blocking copy per epoch
        (pinned for CUDA), so no batch waits for a host-to-device copy."""
        batches = list(self.sampler)
        if not batches:
            return []
        flat = torch.tensor([p for positions in batches for p in positions], dtype=torch.long)
        return list(torch.split(host_to_device(flat, self.device), [len(positions) for positions in batches]))

    def __iter__(self) -> Iterator[Batch]:
        if not self.view.source.decoded_on_demand:
            n = len(self.view)
            for pos in self._epoch_positions():
                # repeated augmentation (sampler.py): copy j of pos has the key source index + j * source size
                copy, pos = pos.div(n, rounding_mode="floor"), pos.remainder(n)
                yield Batch(self._images[pos], self._labels[pos], self._keys[pos] + copy * len(self.view.source))
            return
        for batch in self._batches():
            images, labels, keys, bad = batch
            if bad:
                if not self.view.source.skip_bad:
                    raise UserError(
                        f"{bad[0]}; delete or replace the file, or set data.skip_bad_images=true to skip such files"
                    )
                self.dropped.extend(bad)
                if images is None:
                    raise UserError(f"every image of a batch is unreadable ({bad[0]}, ...); fix or remove these files")
            yield Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                        keys.to(self.device, non_blocking=True))


def train_loader(view: SplitView, global_batch: int, world_size: int, rank: int, seed: int, device,
                 num_workers: int = 0, max_steps=None, prefetch_factor: int = 4, gpu_decode: bool = False,
                 repeats: int = 1) -> BatchLoader:
    if getattr(view.source, "streamed", False):  # WebDataset shards: read in shard order (shard_loader.py)
        return _shard_loader(view, device, num_workers, prefetch_factor, seed, gpu_decode, repeats,
                             plan=_shard_train_plan(view, global_batch, world_size, rank, seed, max_steps))
    if repeats > 1 and gpu_decode:
        raise UserError(
            "data.repeats > 1 does not work with data.gpu_decode=true yet; set data.gpu_decode=false or data.repeats=1"
        )
    sampler = GlobalBatchSampler(
        len(view), global_batch, world_size, rank, seed, shuffle=True, max_steps=max_steps, repeats=repeats
    )
    return BatchLoader(view, sampler, device, num_workers, train=True, seed=seed, prefetch_factor=prefetch_factor,
                       gpu_decode=gpu_decode)


def eval_loader(view: SplitView, global_batch: int, world_size: int, rank: int, device, num_workers: int = 0,
                prefetch_factor: int = 4, gpu_decode: bool = False) -> BatchLoader:
    if getattr(view.source, "streamed", False):
        return _shard_loader(
            view,
            device,
            num_workers,
            prefetch_factor,
            0,
            gpu_decode,
            1,
            eval_batch=max(1, global_batch // world_size),
            world_size=world_size,
            rank=rank,
        )
    sampler = EvalShardSampler(len(view), max(1, global_batch // world_size), world_size, rank)
    return BatchLoader(view, sampler, device, num_workers, prefetch_factor=prefetch_factor, gpu_decode=gpu_decode)


def _shard_train_plan(view: SplitView, global_batch: int, world_size: int, rank: int, seed: int, max_steps):
    from distcls.data.shard_plan import TrainPlan
    src = view.source
    return TrainPlan(
        src.shards.prefix(len(view)), src.streams, src.window, global_batch, world_size, rank, seed, max_steps
    )


def _shard_loader(
    view: SplitView, device, num_workers: int, prefetch_factor: int, seed: int, gpu_decode: bool, repeats: int, **how
):
    """A ShardBatchLoader (shard_loader.py) of a split of WebDataset shards: a prefix of their order."""
    from distcls.data.shard_loader import ShardBatchLoader
    if gpu_decode or repeats > 1:
        raise UserError(
            "data.name=webdataset reads shards in order: "
            f"{'data.gpu_decode=true' if gpu_decode else f'data.repeats={repeats}'} "
            f"does not work with it yet; set {'data.gpu_decode=false' if gpu_decode else 'data.repeats=1'}"
        )
    if len(view) and int(view.indices[-1]) != len(view) - 1:
        raise UserError(
            "data.name=webdataset: a split of shards is a prefix of their order; it cannot be re-split or subsampled"
        )
    return ShardBatchLoader(view, device, num_workers, prefetch_factor, seed, **how)
