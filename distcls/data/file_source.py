"""Image files as a dataset source: `FileSource` (a list of (path, label) decoded on demand by
DataLoader workers, imagefolder) and `CropPolicy` (how a decoded image becomes a training or
evaluation image). Decoding is images.py's, imported when a file is first read (torchvision.io).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset

from distcls.data.transforms.keys import Stream, keyed_uniform_scalar
from distcls.data.sample_table import SampleTable


@dataclass(frozen=True)
class CropPolicy:
    """How a file source turns a decoded image into a size x size training/evaluation image.

    Evaluation: torchvision's Resize(eval_resize) + CenterCrop(size) themselves (the shorter side
    to `eval_resize`, antialiased, then the central size x size), what pretrained weights were
    measured with. Training with `rrc`: a RandomResizedCrop of (scale, ratio) keyed by (seed,
    epoch, sample key) to `train_size`, the crop taken before the resize, in the decoded image's
    pixels; training without it: the evaluation transform at `train_size` (the resize scaled
    alike). `hflip`: the training flip, done here on the uint8 crop (keyed like augment.py's,
    Stream.FLIP), so the batched on-device augmentation skips it. `train_size` None: `size` (FixRes
    trains smaller than it evaluates: data.train_crop_size / data.eval_crop_size).
    """
    size: int
    eval_resize: int
    rrc: Optional[tuple] = None  # ((min_scale, max_scale), (min_ratio, max_ratio)), or None
    hflip: bool = False
    train_size: Optional[int] = None
    interpolation: str = "bilinear"  # or bicubic; always antialiased

    def box(self, height: int, width: int, train: bool, seed: int, epoch: int, key: int):
        # torchvision.io: imported only for image files
        from distcls.data.transforms.images import center_crop_box, random_resized_crop_box
        if train and self.rrc is not None:
            return random_resized_crop_box(height, width, self.rrc[0], self.rrc[1], seed, epoch, key)
        return center_crop_box(height, width, self.size, self.eval_resize)

    def apply(self, img: torch.Tensor, train: bool, seed: int, epoch: int, key: int) -> torch.Tensor:
        """uint8 [C, H, W] (any size) -> uint8 [C, s, s] (s: train_size when training, else size):
        crop and resize, and when training maybe flip."""
        from distcls.data.transforms.images import crop_resize, resize_center_crop
        size = (self.train_size or self.size) if train else self.size
        if train and self.rrc is not None:
            out = crop_resize(
                img, self.box(img.shape[1], img.shape[2], train, seed, epoch, key), size, self.interpolation
            )
        else:
            resize = self.eval_resize if size == self.size else max(size, round(self.eval_resize * size / self.size))
            out = resize_center_crop(img, resize, size, self.interpolation)
        if train and self.hflip and keyed_uniform_scalar(seed, epoch, key, Stream.FLIP) < 0.5:
            out = out.flip(-1)
        return out


@dataclass
class FileSource(Dataset):
    """Image files decoded on demand to uint8 [C, size, size] (see CropPolicy)."""
    samples: SampleTable  # (path, label) pairs as flat arrays (a list of pairs is converted)
    size: int
    channels: int = 3
    policy: Optional[CropPolicy] = None  # None: resize to size/0.875, center crop
    skip_bad: bool = False  # a file that fails to decode is dropped from its batch (warned, counted)
    decoded_on_demand = True  # decoded from the files when a batch needs them (DataLoader workers)

    def __post_init__(self):
        if not isinstance(self.samples, SampleTable):
            self.samples = SampleTable.from_pairs(self.samples)
        if self.policy is None:
            self.policy = CropPolicy(self.size, default_eval_resize(self.size))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.samples.labels).long()

    def load(self, index: int, train: bool = False, seed: int = 0, epoch: int = 0, key: Optional[int] = None):
        """(uint8 [C, size, size], label, key, None), or (None, label, key, message) for a bad file;
        `key` (default: index) keys the random crop and flip (a repeated copy has its own)."""
        key = index if key is None else key
        from distcls.data.transforms.images import BadImage, read_image
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
        return FileSource(self.samples.concat(other.samples), self.size, self.channels, self.policy, self.skip_bad)


# the shipped datasets decoded from files: cropped and resized by a CropPolicy
FILE_DATASETS = ("imagefolder", "webdataset")


def crop_policy(cfg) -> tuple:
    """(evaluation size, channels, CropPolicy) of a dataset decoded from files, by the data.* keys
    (sizes default to 224 and channels to 3: torchvision's ImageNet recipes)."""
    size = cfg.eval_crop_size or cfg.image_size or 224  # the model's input size (evaluation)
    # config.py checks the sizes it sees; here with the defaults
    if cfg.eval_resize is not None and cfg.eval_resize < size:
        from distcls.errors import ConfigError
        raise ConfigError(
            f"data.eval_resize={cfg.eval_resize} is smaller than the evaluation crop {size} (data.eval_crop_size, "
            f"else data.image_size, else 224): the center crop would not fit; set data.eval_resize >= {size} or a "
            "smaller data.eval_crop_size"
        )
    aug = cfg.augment
    policy = CropPolicy(size, cfg.eval_resize or default_eval_resize(size),
                        (tuple(aug.scale), tuple(aug.ratio)) if aug.random_resized_crop else None, aug.hflip,
                        cfg.train_crop_size or cfg.image_size or 224, cfg.interpolation)
    return size, cfg.channels or 3, policy


def evaluation_resize(data_cfg, size: int) -> int:
    """The shorter side an image is resized to before the center crop, as the checkpoint's evaluation does it."""
    # in-memory data evaluates the whole image at the input size: eval_resize is not used
    if data_cfg.name not in FILE_DATASETS:
        return size
    return data_cfg.eval_resize if data_cfg.eval_resize is not None else default_eval_resize(size)


def default_eval_resize(size: int) -> int:
    """The evaluation resize of torchvision's reference recipe: the shorter side to size / 0.875 (224 -> 256)."""
    return int(round(size / 0.875))


def load_eval_image(
    path, size: int, channels: int, eval_resize: Optional[int] = None, interpolation: str = "bilinear"
) -> torch.Tensor:
    """One image file as distcls evaluates it: uint8 [channels, size, size] (16-bit/float scaled to 8 bits).

    Raises `images.BadImage` (a message naming the file) when it cannot be decoded.
    """
    from distcls.data.transforms.images import read_image
    img = read_image(path, channels)
    return CropPolicy(size, eval_resize or default_eval_resize(size), interpolation=interpolation).apply(
        img, False, 0, 0, 0
    )
