"""The one hash behind every keyed random choice: (seed, epoch, sample key, stream) -> a uniform
number, the same on every rank, worker and world size (splitmix64 chained over the four parts).
Augmentation (augment.py, policies.py) and Mixup/CutMix (mix.py) draw from it."""
from __future__ import annotations

import numpy as np
import torch

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
