"""The training loss, built from train.*: hard labels or the soft targets of Mixup/CutMix.

Hard labels (int64 [B]): cross-entropy with `train.label_smoothing` (as before, bit for bit).
Soft targets (float [B, classes], data/mix.py, which already folded the label smoothing in):
timm's SoftTargetCrossEntropy. Training accuracy with soft targets counts a prediction as right
when it is the target's dominant class (the label with the larger share of the mix).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distcls.data.transforms.mix import dominant_correct, soft_target_cross_entropy


@dataclass(frozen=True)
class TrainingLoss:
    label_smoothing: float = 0.0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 2:
            return soft_target_cross_entropy(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    @staticmethod
    def correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How many predictions are right: the label, or with soft targets their dominant class."""
        if targets.dim() == 2:
            return dominant_correct(logits, targets)
        return (logits.argmax(1) == targets).sum()
