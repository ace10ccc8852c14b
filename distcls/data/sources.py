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


@dataclass(frozen=True)
class CropPolicy:
    """How a file source turns a decoded image into a size x size training/evaluation image.

    Evaluation: torchvision's Resize(eval_resize) + CenterCrop(size) themselves (the shorter side
    to `eval_resize`, antialiased, then the central size x size), what pretrained weights were
    measured with. Training with `rrc`: a RandomResizedCrop of (scale, ratio) keyed by (seed,
    epoch, sample key) to `train_size`, the crop taken before the resize, in the decoded image's
    pixels; training without it: the evaluation transform at `train_size` (the resize scaled
    alike). `hflip`: the training flip, done here on the uint8 crop (keyed like augment.py's,
    stream 3), so the batched on-device augmentation skips it. `train_size` None: `size` (FixRes
    trains smaller than it evaluates: data.train_crop_size / data.eval_crop_size).
    """
    size: int
    eval_resize: int
    rrc: Optional[tuple] = None  # ((min_scale, max_scale), (min_ratio, max_ratio)), or None
    hflip: bool = False
    train_size: Optional[int] = None
    interpolation: str = "bilinear"  # or bicubic; always antialiased

    def box(self, height: int, width: int, train: bool, seed: int, epoch: int, key: int):
        from distcls.data.images import center_crop_box, random_resized_crop_box
        if train and self.rrc is not None:
            return random_resized_crop_box(height, width, self.rrc[0], self.rrc[1], seed, epoch, key)
        return center_crop_box(height, width, self.size, self.eval_resize)

    def apply(self, img: torch.Tensor, train: bool, seed: int, epoch: int, key: int) -> torch.Tensor:
        """uint8 [C, H, W] (any size) -> uint8 [C, s, s] (s: train_size when training, else size):
        crop and resize, and when training maybe flip."""
        from distcls.data.images import crop_resize, keyed_uniform_scalar, resize_center_crop
        size = (self.train_size or self.size) if train else self.size
        if train and self.rrc is not None:
            out = crop_resize(img, self.box(img.shape[1], img.shape[2], train, seed, epoch, key), size, self.interpolation)
        else:
            resize = self.eval_resize if size == self.size else max(size, round(self.eval_resize * size / self.size))
            out = resize_center_crop(img, resize, size, self.interpolation)
        if train and self.hflip and keyed_uniform_scalar(seed, epoch, key, 3) < 0.5:
            out = out.flip(-1)
        return out


@dataclass
class FileSource(Dataset):
    """Image files decoded on demand to uint8 [C, size, size] (see CropPolicy)."""
    samples: list  # [(path, label)]
    size: int
    channels: int = 3
    policy: Optional[CropPolicy] = None  # None: resize to size/0.875, center crop
    skip_bad: bool = False  # a file that fails to decode is dropped from its batch (warned, counted)
    streaming = True

    def __post_init__(self):
        if self.policy is None:
            self.policy = CropPolicy(self.size, default_eval_resize(self.size))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def load(self, index: int, train: bool = False, seed: int = 0, epoch: int = 0, key: Optional[int] = None):
        """(uint8 [C, size, size], label, key, None), or (None, label, key, message) for a bad file;
        `key` (default: index) keys the random crop and flip (a repeated copy has its own)."""
        key = index if key is None else key
        from distcls.data.images import BadImage, read_image
        path, label = self.samples[index]
        try:
            img = read_image(path, self.channels)
        except BadImage as exc:
            return None, label, key, str(exc)
        return self.policy.apply(img, train, seed, epoch, key), label, key, None

    def __getitem__(self, index: int):
        img, label, index, bad = self.load(index)
        if img is None:
            from distcls.errors import UserError
            raise UserError(bad)
        return img, label, index

    def concat(self, other: "FileSource") -> "FileSource":
        return FileSource(self.samples + other.samples, self.size, self.channels, self.policy, self.skip_bad)


def default_eval_resize(size: int) -> int:
    """The evaluation resize of torchvision's reference recipe: the shorter side to size / 0.875 (224 -> 256)."""
    return int(round(size / 0.875))


def decode_image(path, size: int, channels: int, eval_resize: Optional[int] = None, interpolation: str = "bilinear") -> torch.Tensor:
    """One image file as distcls evaluates it: uint8 [channels, size, size] (16-bit/float scaled to 8 bits).

    Raises `images.BadImage` (a message naming the file) when it cannot be decoded.
    """
    from distcls.data.images import read_image
    img = read_image(path, channels)
    return CropPolicy(size, eval_resize or default_eval_resize(size), interpolation=interpolation).apply(img, False, 0, 0, 0)


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


def printable_name(name: str) -> str:
    """A class name any console, JSON file or font can show: a folder name that is not valid UTF-8
    (Python reads its bytes as surrogate escapes) gets them as \\xNN, e.g. b'caf\\xe9' -> 'caf\\xe9'."""
    if not isinstance(name, str):
        return str(name)
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def class_labels(names: Sequence[str], num_classes: int) -> list:
    """`names` (printable) when there is one per class, else "0".."num_classes-1"."""
    return [printable_name(n) for n in names] if len(names) == num_classes else [str(i) for i in range(num_classes)]


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its inputs; stored in every checkpoint."""
    channels: int
    num_classes: int
    image_size: int
    class_names: tuple = field(default=())
    mean: tuple = ()
    std: tuple = ()

    @property
    def labels(self) -> list:
        """The class names to print: `class_names`, or "0".."n-1" when the dataset names no classes."""
        return class_labels(self.class_names, self.num_classes)

    def to_dict(self) -> dict:
        return {"channels": self.channels, "num_classes": self.num_classes, "image_size": self.image_size,
                "class_names": list(self.class_names), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(int(d["channels"]), int(d["num_classes"]), int(d["image_size"]),
                   tuple(d.get("class_names", ())), tuple(d.get("mean", ())), tuple(d.get("std", ())))
