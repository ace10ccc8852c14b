"""Batched preprocessing and augmentation on the training device (the airbench approach).

Input: a uint8 batch [B, C, H, W] and each sample's key (its index in the dataset). Output:
normalized float images. Every random choice is a pure function of (seed, epoch, key, stream),
computed with a counter-based hash, so a sample is augmented identically whichever rank, worker
or batch position handles it: world-size invariance and exact resume need nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from distcls.config import AugmentConfig

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def keyed_uniform(seed: int, epoch: int, keys: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform [0, 1) float64 per key; same (seed, epoch, key, stream) -> same number."""
    k = keys.detach().cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full_like(k, np.uint64(seed)))
        h = _splitmix64(h ^ np.uint64(epoch))
        h = _splitmix64(h ^ np.uint64(stream))
        h = _splitmix64(h ^ k)
    return torch.from_numpy((h >> np.uint64(11)).astype(np.float64) / float(1 << 53))


@dataclass(frozen=True)
class Preprocess:
    channels: int  # target channels
    image_size: int  # target square size
    mean: tuple
    std: tuple
    augment: AugmentConfig
    seed: int

    def __call__(self, images: torch.Tensor, keys: torch.Tensor, epoch: int, train: bool,
                 memory_format=torch.contiguous_format) -> torch.Tensor:
        # Pixels stay on the 0..255 scale until the end: normalization folds in the /255, so a
        # batch costs few passes over memory (this runs in the training process, per batch).
        x = self._match_channels(images.float())
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        if train:
            x = self._augment(x, keys, epoch)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) * 255.0
        return x.sub_(mean).div_(std).contiguous(memory_format=memory_format)  # in place: x is this batch's own float copy

    def _match_channels(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.channels:
            return x
        if x.shape[1] == 1 and self.channels == 3:
            return x.expand(-1, 3, -1, -1).contiguous()
        if x.shape[1] == 3 and self.channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            return (x * w).sum(dim=1, keepdim=True)
        raise ValueError(f"cannot convert {x.shape[1]} channels to {self.channels}")

    def _augment(self, x: torch.Tensor, keys: torch.Tensor, epoch: int) -> torch.Tensor:
        aug, dev = self.augment, x.device
        if aug.crop_padding > 0:
            pad = aug.crop_padding
            b, _, h, w = x.shape
            oy = (keyed_uniform(self.seed, epoch, keys, 1) * (2 * pad + 1)).long().to(dev)
            ox = (keyed_uniform(self.seed, epoch, keys, 2) * (2 * pad + 1)).long().to(dev)
            padded = F.pad(x, (pad, pad, pad, pad))
            rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])  # B,H
            cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])  # B,W
            bi = torch.arange(b, device=dev)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if aug.hflip:
            flip = (keyed_uniform(self.seed, epoch, keys, 3) < 0.5).nonzero().squeeze(1).to(dev)
            if len(flip):
                x.index_copy_(0, flip, x.index_select(0, flip).flip(-1))  # x is this batch's own float copy
        if aug.rotation_deg > 0:
            u = keyed_uniform(self.seed, epoch, keys, 4)
            theta = ((u * 2 - 1) * aug.rotation_deg * math.pi / 180).to(dev, x.dtype)
            cos, sin = torch.cos(theta), torch.sin(theta)
            zero = torch.zeros_like(cos)
            mat = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
            grid = F.affine_grid(mat, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x
