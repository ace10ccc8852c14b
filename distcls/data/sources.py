"""What a dataset builder returns, and the split views the loaders read from.

A *source* holds samples as uint8 images with int64 labels:
- `TensorSource`: everything in memory as one uint8 tensor [N, C, H, W] (digits, MNIST, CIFAR,
  synthetic); batches are gathered by indexing, augmentation runs batched on the device.
- `FileSource`: a list of (path, label) decoded on demand by DataLoader workers (imagefolder).
A `SplitView` is a source plus the indices of one split (train/val/test) into it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import Dataset


@dataclass
class TensorSource:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    streaming = False

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"TensorSource needs uint8 images [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
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


@dataclass
class FileSource(Dataset):
    """Image files decoded to uint8 [C, size, size]: shorter side resized to `size`, center crop."""
    samples: list  # [(path, label)]
    size: int
    channels: int = 3
    streaming = True

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return decode_image(path, self.size, self.channels), label, index

    def concat(self, other: "FileSource") -> "FileSource":
        return FileSource(self.samples + other.samples, self.size, self.channels)


def decode_image(path, size: int, channels: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        t = pil_to_tensor(img)
    t = resize(t, size, antialias=True)
    return center_crop(t, [size, size])


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


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its inputs; stored in every checkpoint."""
    channels: int
    num_classes: int
    image_size: int
    class_names: tuple = field(default=())
    mean: tuple = ()
    std: tuple = ()

    def to_dict(self) -> dict:
        return {"channels": self.channels, "num_classes": self.num_classes, "image_size": self.image_size,
                "class_names": list(self.class_names), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(int(d["channels"]), int(d["num_classes"]), int(d["image_size"]),
                   tuple(d.get("class_names", ())), tuple(d.get("mean", ())), tuple(d.get("std", ())))
