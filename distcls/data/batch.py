"""What a loader hands the engine: a `Batch` of uint8 images, labels and augmentation keys on the
device, and the collation of decoded samples (some of them bad) into one."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, C, H, W] on device
    labels: torch.Tensor  # int64 [B] on device
    # int64 [B] on device: the augmentation key, index into the split's source (+ copy * source size with data.repeats)
    keys: torch.Tensor


def collate_decoded(items):
    """Decoded samples (image or None, label, key, message) -> (images, labels, keys, [messages of the bad ones])."""
    good = [it for it in items if it[0] is not None]
    bad = [it[3] for it in items if it[0] is None]
    if not good:
        return None, None, None, bad
    return (torch.stack([it[0] for it in good]), torch.tensor([it[1] for it in good], dtype=torch.long),
            torch.tensor([it[2] for it in good], dtype=torch.long), bad)
