"""What a dataset builder returns, and the split views the loaders read from.

A *source* holds samples as uint8 images with int64 labels:
- `TensorSource` (here): everything in memory as one uint8 tensor [N, C, H, W] (digits, MNIST,
  CIFAR, synthetic); batches are gathered by indexing, augmentation runs batched on the device.
- `FileSource` (file_source.py): a list of (path, label) decoded on demand by DataLoader workers (imagefolder).
A `SplitView` is a source plus the indices of one split (train/val/test) into it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from distcls.data.file_source import FileSource


@dataclass
class TensorSource:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    decoded_on_demand = False  # already decoded, in memory

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"TensorSource needs uint8 images [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    def concat(self, other: "TensorSource") -> "TensorSource":
        return TensorSource(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]))


Source = Union[TensorSource, FileSource]


@dataclass
class SplitView:
    source: Source
    indices: torch.Tensor  # int64 indices into source

    def __len__(self) -> int:
        return len(self.indices)

    def truncated(self, n: Optional[int]) -> "SplitView":
        return self if n is None or n >= len(self) else SplitView(self.source, self.indices[:n])


@dataclass
class RawDataset:
    """What a dataset builder returns: official splits as sources plus metadata."""
    train: Source
    test: Optional[Source]  # None: the dataset has no official test split
    class_names: Sequence[str]
    mean: Sequence[float]
    std: Sequence[float]
    val: Optional[Source] = None  # an official validation split, if the dataset has one
    skipped_files: Sequence[str] = ()  # bad files left out before training (data.skip_bad_images=true)
    notes: Sequence[str] = ()  # what building it did, for the console (e.g. an image folder read from its index)
