"""The one hash behind every keyed random choice: (seed, epoch, sample key, stream) -> a uniform
number in [0, 1), the same on every rank, worker and world size (splitmix64 chained over the four
parts). `keyed_uniform` draws for a tensor of keys (the batched augmentation, Mixup/CutMix),
`keyed_uniform_scalar` for one key in plain Python (a DataLoader worker's crop and flip): the same
numbers. `Stream` is the one table of stream ids: every op draws from its own block, and
tests/test_sampler_and_augment.py checks that no two blocks overlap."""
from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_M64 = (1 << 64) - 1


class Stream(IntEnum):
    """The first stream id of each op's block (BLOCKS: how many ids it may use from there)."""
    CROP_Y = 1  # the padded random crop (in-memory data)
    CROP_X = 2
    FLIP = 3  # the horizontal flip: on the device, or in an image folder's workers (the same draw)
    ROTATION = 4
    RESIZED_CROP = 100  # RandomResizedCrop: 4 draws per try, images.RRC_TRIES tries
    POLICY = 200  # TrivialAugment / RandAugment / AutoAugment: a few draws per layer
    ERASE = 300  # random erasing: 1 + 4 per try, policies.ERASE_TRIES tries
    MIX = 400  # Mixup / CutMix: 5 draws


BLOCKS = {
    Stream.CROP_Y: 1,
    Stream.CROP_X: 1,
    Stream.FLIP: 1,
    Stream.ROTATION: 1,
    Stream.RESIZED_CROP: 40,
    Stream.POLICY: 100,
    Stream.ERASE: 50,
    Stream.MIX: 10,
}


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


def _splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def keyed_uniform_scalar(seed: int, epoch: int, key: int, stream: int) -> float:
    """`keyed_uniform` for one key, in plain Python (no numpy call per draw: a worker draws a few per image)."""
    h = _splitmix64_int(_splitmix64_int(_splitmix64_int(_splitmix64_int(seed & _M64) ^ epoch) ^ stream) ^ (key & _M64))
    return (h >> 11) / float(1 << 53)


def keyed_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the seed, the epoch, ...), chained through splitmix64: tuples that
    differ give unrelated seeds (no arithmetic collisions such as a * K + b)."""
    h = 0
    for part in parts:
        h = _splitmix64_int(h ^ (int(part) & _M64))
    return h >> 1
