"""Batched preprocessing and augmentation on the training device (the airbench approach).

Input: a uint8 batch [B, C, H, W] and each sample's key (its index in the dataset). Output:
normalized float images. Every random choice is a pure function of (seed, epoch, key, stream),
computed with a counter-based hash, so a sample is augmented identically whichever rank, worker
or batch position handles it: world-size invariance and exact resume need nothing else.

Nothing here makes the host wait for the device: the normalization constants are made once per
device, and when the number of keys is known the draws of a whole epoch (every key) are hashed
once on the host and copied to the device in one non-blocking copy; a batch only indexes them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from distcls.config import AugmentConfig
from distcls.runtime.copies import host_to_device
from distcls.data.transforms import pixels
from distcls.data.transforms import policies
from distcls.data.transforms.keys import Stream, keyed_uniform
from distcls.data.transforms.mix import Mix
from distcls.spec import DataSpec



@dataclass(frozen=True)
class Draws:
    """The random choices of one epoch for a list of keys, one row per key; None: stream unused.

    crop_y/crop_x: int64 offsets into the padded image in [0, 2 * crop_padding]; flip: bool;
    angle: float64 radians in [-rotation_deg, +rotation_deg]; ops/mags: the policy's op ids int64
    and signed magnitudes float64 [N, layers] (policies.py); erase: int64 [N, 4] boxes (top, left,
    h, w; h = 0: not erased) in the size x size image.
    """
    crop_y: Optional[torch.Tensor] = None
    crop_x: Optional[torch.Tensor] = None
    flip: Optional[torch.Tensor] = None
    angle: Optional[torch.Tensor] = None
    ops: Optional[torch.Tensor] = None
    mags: Optional[torch.Tensor] = None
    erase: Optional[torch.Tensor] = None

    @classmethod
    def hashed(
        cls, aug: AugmentConfig, seed: int, epoch: int, keys: torch.Tensor, size: int = 0, with_flip: bool = True
    ) -> "Draws":
        """On the host (numpy hash), only the streams `aug` uses; `size`: the (square) image size
        the policy and erasing see; `with_flip` False: the flip is another stage's (an image folder's workers)."""
        crop_y = crop_x = flip = angle = ops = mags = erase = None
        if aug.crop_padding > 0:
            span = 2 * aug.crop_padding + 1
            crop_y = (keyed_uniform(seed, epoch, keys, Stream.CROP_Y) * span).long()
            crop_x = (keyed_uniform(seed, epoch, keys, Stream.CROP_X) * span).long()
        if aug.hflip and with_flip:
            flip = keyed_uniform(seed, epoch, keys, Stream.FLIP) < 0.5
        if aug.rotation_deg > 0:
            angle = (keyed_uniform(seed, epoch, keys, Stream.ROTATION) * 2 - 1) * aug.rotation_deg * math.pi / 180
        def uniform(stream: int, rows=None) -> np.ndarray:  # the keyed uniforms of every key (or of keys[rows])
            return keyed_uniform(seed, epoch, keys if rows is None else keys[torch.from_numpy(rows)], stream).numpy()
        spec = policies.policy_spec(aug, size, size)
        if spec is not None:
            ops, mags = spec.draw(uniform)
        if aug.erase_prob > 0:
            erase = policies.erase_boxes(uniform, aug.erase_prob, aug.erase_scale, aug.erase_ratio, size, size)
        return cls(crop_y, crop_x, flip, angle, ops, mags, erase)

    def _map(self, fn) -> "Draws":
        return Draws(*(None if t is None else fn(t) for t in (getattr(self, f.name) for f in dataclasses.fields(self))))

    def to(self, device: torch.device) -> "Draws":
        return self._map(lambda t: host_to_device(t, device))

    def index(self, rows: torch.Tensor) -> "Draws":
        """The draws of the keys `rows` (a tensor on this table's device): a gather, no host sync."""
        return self._map(lambda t: t[rows])


@dataclass(frozen=True)
class Preprocess:
    """uint8 batch -> normalized (and, when training, augmented) float batch on the batch's device.

    `num_keys` (the size of the training source: every key is below it) lets a training batch
    index a per-epoch table of draws kept on the device; without it (evaluation, predict) the
    draws are hashed per batch on the host, the same numbers either way.
    """
    channels: int  # target channels
    image_size: int  # target square size
    mean: tuple
    std: tuple
    augment: AugmentConfig
    seed: int
    num_keys: Optional[int] = None
    mix: Optional[Mix] = None  # Mixup/CutMix of training batches (train_batch), after normalization and erasing
    train_size: Optional[int] = None  # training image size (FixRes; None: image_size)
    interpolation: str = "bilinear"  # of the resize to the target size (antialiased)
    # False: data.augment.hflip is done per sample in the workers (file sources' CropPolicy)
    flip_on_device: bool = True
    # Per device: normalization constants, and the current epoch's draws. Not part of the value.
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_spec(cls, spec: DataSpec, augment: AugmentConfig, seed: int, num_keys: Optional[int] = None,
                  mix: Optional[Mix] = None, train_size: Optional[int] = None, interpolation: str = "bilinear",
                  flip_on_device: bool = True) -> "Preprocess":
        return cls(spec.channels, spec.image_size, tuple(spec.mean), tuple(spec.std), augment, seed, num_keys, mix,
                   train_size, interpolation, flip_on_device)

    @property
    def train_image_size(self) -> int:
        return self.train_size or self.image_size

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, epoch: int,
                    memory_format=torch.contiguous_format, out: Optional[torch.Tensor] = None) -> tuple:
        """A training batch: (augmented normalized images, targets): the int64 labels, or with
        Mixup/CutMix soft targets float32 [B, classes] (label smoothing folded in). `out`: see __call__."""
        x = self(images, keys, epoch, train=True, out=out)
        if self.mix is not None:
            x, labels = self.mix(x, labels, keys, epoch)
        return x.contiguous(memory_format=memory_format), labels

    def __call__(self, images: torch.Tensor, keys: torch.Tensor, epoch: int, train: bool,
                 memory_format=torch.contiguous_format, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`out`: a float32 tensor the caller lends for the batch (overwritten; the result is `out`
        itself unless the images need resizing or other channels, or a crop is drawn): the
        Trainer's buffer on the CPU, where a fresh batch-sized tensor costs a page fault per 4 KiB
        (10 ms at 224 px, batch 64)."""
        # Pixels stay on the 0..255 scale until the end: normalization folds in the /255, so a
        # batch costs few passes over memory (this runs in the training process, per batch).
        size = self.train_image_size if train else self.image_size
        fits = (
            out is not None
            and out.shape == images.shape
            and out.dtype == torch.float32
            and out.device == images.device
            and images.shape[1] == self.channels
            and tuple(images.shape[-2:]) == (size, size)
        )
        # the batch's own copy
        x = out.copy_(images) if fits else self.match_channels(images.to(torch.float32, copy=True))
        x = pixels.resize_square(x, size, self.interpolation)
        draws = self.draws(keys, epoch, x.device) if train else None
        if train:
            # still uint8 values (not resized, not turned gray): the policy need not round them first
            on_grid = (
                images.dtype == torch.uint8
                and tuple(images.shape[-2:]) == (size, size)
                and images.shape[1] in (1, self.channels)
            )
            x = self._augment(x, draws, on_grid)
        mean, std = self._constant("norm", x, lambda dt: (torch.tensor(self.mean, dtype=dt).view(1, -1, 1, 1) * 255.0,
                                                          torch.tensor(self.std, dtype=dt).view(1, -1, 1, 1) * 255.0))
        x = x.sub_(mean).div_(std)  # in place: x is this batch's own float copy
        if train and draws.erase is not None:  # after normalization, as torchvision's recipe (value 0 = the mean)
            x = policies.erase(x, draws.erase, self.augment.erase_value)
        return x.contiguous(memory_format=memory_format)

    def draws(self, keys: torch.Tensor, epoch: int, device: torch.device) -> Draws:
        """The augmentation draws of `keys` (on the host or on `device`) for `epoch`, on `device`."""
        if self.num_keys is None:
            return Draws.hashed(self.augment, self.seed, epoch, keys, self.train_image_size, self.flip_on_device).to(
                device
            )
        return self.epoch_table(epoch, device).index(keys.to(device, non_blocking=True))

    def epoch_table(self, epoch: int, device: torch.device) -> Draws:
        """The draws of every key 0..num_keys-1 for `epoch` on `device`: hashed and copied once per epoch."""
        slot = ("draws", device)
        cached = self._cache.get(slot)
        if cached is None or cached[0] != epoch:
            table = Draws.hashed(self.augment, self.seed, epoch, torch.arange(self.num_keys), self.train_image_size,
                                 self.flip_on_device).to(device)
            cached = self._cache[slot] = (epoch, table)
        return cached[1]

    def _constant(self, name: str, like: torch.Tensor, make):
        """`make(dtype)`'s host tensors (one or a tuple) on `like`'s device, in its dtype: made and copied once."""
        slot = (name, like.device, like.dtype)
        if slot not in self._cache:
            made = make(like.dtype)
            self._cache[slot] = tuple(host_to_device(t, like.device) for t in made) if isinstance(made, tuple) \
                else host_to_device(made, like.device)
        return self._cache[slot]

    def match_channels(self, x: torch.Tensor) -> torch.Tensor:
        """A float batch with the target channels (pixels.match_channels, its weights kept on the device)."""
        gray = x.shape[1] == 3 and self.channels == 1
        w = (
            self._constant("gray", x, lambda dt: torch.tensor(pixels.GRAY_WEIGHTS, dtype=dt).view(3, 1, 1))
            if gray
            else None
        )
        x = pixels.match_channels(x, self.channels, w)
        if x.shape[1] != self.channels:
            raise ValueError(f"cannot convert {x.shape[1]} channels to {self.channels}")
        return x

    def _augment(self, x: torch.Tensor, draws: Draws, on_grid: bool = False) -> torch.Tensor:
        if draws.crop_y is not None or draws.flip is not None:
            x = self._crop_flip(x, draws)
        if draws.angle is not None:
            theta = draws.angle.to(x.dtype)
            cos, sin = torch.cos(theta), torch.sin(theta)
            zero = torch.zeros_like(cos)
            mat = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
            grid = F.affine_grid(mat, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if draws.ops is not None:  # on the uint8 grid, after crop and flip, as torchvision's recipe
            on_grid = on_grid and draws.angle is None  # a rotation interpolates
            x = policies.apply_policy(x, draws.ops, draws.mags, self.augment.policy_interpolation, on_grid)
        return x

    def _crop_flip(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Crop (zero padding, then a window at the drawn offsets), then flip the drawn samples: two
        gathers, rows then columns, with the flip folded into the column index (no host sync)."""
        b, c, h, w = x.shape
        if draws.crop_y is None and x.device.type == "cpu":  # a flip alone: the drawn samples, each in place
            for i in torch.nonzero(draws.flip).flatten().tolist():
                x[i].copy_(x[i].flip(-1))
            return x
        cols = torch.arange(w, device=x.device).expand(b, w)
        if draws.flip is not None:
            cols = torch.where(draws.flip[:, None], cols.flip(-1), cols)
        if draws.crop_y is not None:
            pad = self.augment.crop_padding
            x = F.pad(x, (pad, pad, pad, pad))
            rows = draws.crop_y[:, None] + torch.arange(h, device=x.device)
            x = x.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pad))
            cols = draws.crop_x[:, None] + cols
        return x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))
