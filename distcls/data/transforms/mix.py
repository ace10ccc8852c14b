"""Mixup and CutMix, keyed and batched on the device, world-size invariant.

Pairing: samples 2i and 2i+1 of the GLOBAL batch are partners (timm's `mixup_mode='pair'`). The
sampler gives each rank a contiguous, even-sized slice of the global batch (train.check_launch
requires an even per-rank batch), so a pair never straddles two ranks and every rank mixes exactly
the pairs a single process would. Each pair's choices (mixed or not, CutMix or Mixup, lambda, the
box) are drawn from the key of its FIRST sample, from the same counter-based hash as the other
augmentation (augment.py), in a per-epoch table on the device: no collective, no host sync.

mode=pair: one lambda per pair, both partners mixed symmetrically (a' = lerp(b, a, lam) =
lam a + (1 - lam) b, b' = lam b + (1 - lam) a; CutMix pastes the same box both ways). mode=elem: each sample draws its
own choices from its own key and mixes in its partner (timm's 'elem' with the fixed neighbour as
the partner instead of the reversed batch, which would cross ranks). timm's 'batch' mode (one
lambda for the whole batch, partner = reversed batch) is not offered: its partner of a sample
depends on the batch's other ranks' samples.

Targets are soft [B, classes]: label smoothing first (timm's `mixup_target`: off = s / C,
on = 1 - s + off), then lam * target_a + (1 - lam) * target_b; CutMix's lam is the kept area
fraction after the box is clipped to the image (torchvision's CutMix / timm's correct_lam).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from distcls.runtime.copies import host_to_device
from distcls.data.transforms.keys import Stream, keyed_uniform

MIX_STREAM = Stream.MIX  # its block in keys.Stream


@dataclass(frozen=True)
class MixTable:
    """Per key: mixed (bool), lam (float64: the weight of the sample itself), box int64 [N, 4]
    (y1, y2, x1, x2; empty for Mixup or an unmixed sample)."""
    mixed: torch.Tensor
    lam: torch.Tensor
    box: torch.Tensor

    def to(self, device) -> "MixTable":
        return MixTable(*(host_to_device(t, device) for t in (self.mixed, self.lam, self.box)))


def _beta(alpha: float, u: np.ndarray) -> np.ndarray:
    """Beta(alpha, alpha) by its inverse CDF at keyed uniforms u (exact, no rejection loop)."""
    if alpha == 1.0:
        return u
    from scipy.special import betaincinv  # scipy comes with scikit-learn (a dependency)
    return betaincinv(alpha, alpha, u)


def cutmix_box(lam: np.ndarray, u_y: np.ndarray, u_x: np.ndarray, height: int, width: int):
    """torchvision v2.CutMix's box around a uniform centre; returns (y1, y2, x1, x2, kept fraction)."""
    cy = np.minimum((u_y * height).astype(np.int64), height - 1)
    cx = np.minimum((u_x * width).astype(np.int64), width - 1)
    r = 0.5 * np.sqrt(1.0 - lam)
    rh, rw = (r * height).astype(np.int64), (r * width).astype(np.int64)
    y1, y2 = np.clip(cy - rh, 0, height), np.clip(cy + rh, 0, height)
    x1, x2 = np.clip(cx - rw, 0, width), np.clip(cx + rw, 0, width)
    kept = 1.0 - (y2 - y1) * (x2 - x1) / float(height * width)
    return y1, y2, x1, x2, kept


@dataclass(frozen=True)
class Mix:
    """Keyed Mixup/CutMix of a normalized batch; `num_keys`: the training source's size (the table)."""
    mixup_alpha: float
    cutmix_alpha: float
    prob: float
    switch_prob: float
    mode: str
    label_smoothing: float
    num_classes: int
    image_size: int
    seed: int
    num_keys: int
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_config(cls, mix_cfg, label_smoothing: float, num_classes: int, image_size: int, seed: int,
                    num_keys: int) -> Optional["Mix"]:
        if mix_cfg.mixup_alpha <= 0 and mix_cfg.cutmix_alpha <= 0:
            return None
        return cls(mix_cfg.mixup_alpha, mix_cfg.cutmix_alpha, mix_cfg.prob, mix_cfg.switch_prob, mix_cfg.mode,
                   label_smoothing, num_classes, image_size, seed, num_keys)

    def hashed(self, epoch: int, keys: torch.Tensor) -> MixTable:
        u = [keyed_uniform(self.seed, epoch, keys, MIX_STREAM + j).numpy() for j in range(5)]
        mixed = u[0] < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = u[1] < self.switch_prob
        else:
            cut = np.full(len(keys), self.cutmix_alpha > 0)
        # Beta's inverse CDF is the slow part: only where that lambda is used
        lam_mix, lam_cut = np.ones(len(keys)), np.ones(len(keys))
        use_mix, use_cut = mixed & ~cut, mixed & cut
        if self.mixup_alpha > 0:
            lam_mix[use_mix] = _beta(self.mixup_alpha, u[2][use_mix])
        if self.cutmix_alpha > 0:
            lam_cut[use_cut] = _beta(self.cutmix_alpha, u[2][use_cut])
        y1, y2, x1, x2, kept = cutmix_box(lam_cut, u[3], u[4], self.image_size, self.image_size)
        lam = np.where(mixed, np.where(cut, kept, lam_mix), 1.0)
        box = np.where((mixed & cut)[:, None], np.stack([y1, y2, x1, x2], 1), 0)
        return MixTable(
            torch.from_numpy(mixed), torch.from_numpy(lam.astype(np.float64)), torch.from_numpy(box.astype(np.int64))
        )

    def table(self, epoch: int, device) -> MixTable:
        slot = ("mix", device)
        cached = self._cache.get(slot)
        if cached is None or cached[0] != epoch:
            cached = self._cache[slot] = (epoch, self.hashed(epoch, torch.arange(self.num_keys)).to(device))
        return cached[1]

    @staticmethod
    def _mix_all(x, partner, lam, cut, box):
        other = x.index_select(0, partner)
        out = _lerp(x, other, torch.where(cut, torch.ones_like(lam), lam))
        return _paste(out, other, torch.where(cut[:, None], box, torch.zeros_like(box)))

    @staticmethod
    def _mix_rows(x, partner, lam, cut, box):
        """The same numbers as _mix_all, computed for the mixed rows only, each on views of its own
        row and its partner's, and written into x after every row was read."""
        weights = lam.to(x.dtype)  # as _lerp's
        updates = []  # (row, its region, the new values)
        for r, (p, lam_r, cut_r, (y1, y2, x1, x2)) in enumerate(
            zip(partner.tolist(), lam.tolist(), cut.tolist(), box.tolist())
        ):
            if cut_r:
                updates.append((r, (slice(None), slice(y1, y2), slice(x1, x2)), x[p, :, y1:y2, x1:x2].clone()))
            elif lam_r < 1:
                updates.append((r, (), torch.lerp(x[p], x[r], weights[r])))
        for r, region, values in updates:
            x[r][region].copy_(values)
        return x

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, epoch: int):
        """(mixed images, soft targets float32 [B, classes]); x may be written into (the caller's
        own copy). A trailing unpaired sample (a batch shortened by a skipped bad file) is its own
        partner, i.e. left unmixed."""
        b = x.shape[0]
        pos = torch.arange(b, device=x.device)
        partner = pos ^ 1
        partner = torch.where(partner < b, partner, pos)
        owner = pos if self.mode == "elem" else pos & ~1  # whose key draws the choices
        t = self.table(epoch, x.device)
        rows = keys.to(x.device)[owner]
        lam, box = t.lam[rows], t.box[rows]
        lam = torch.where(partner == pos, torch.ones_like(lam), lam)
        y1, y2, x1, x2 = box.unbind(1)
        cut = (y2 > y1) & (x2 > x1) & (partner != pos)  # CutMix (its lam is the kept area); else Mixup or none
        if x.device.type == "cpu":  # only the mixed samples, in place (the host knows which at once)
            out = self._mix_rows(x, partner, lam, cut, box)
        else:  # the whole batch, no host sync: lam = 1 leaves a sample exactly as it is
            out = self._mix_all(x, partner, lam, cut, box)
        off = self.label_smoothing / self.num_classes
        on = 1.0 - self.label_smoothing + off
        one_hot = torch.full((b, self.num_classes), off, dtype=torch.float32, device=x.device)
        one_hot.scatter_(1, labels.view(-1, 1), on)
        lam32 = lam.to(torch.float32).view(-1, 1)
        targets = one_hot * lam32 + one_hot[partner] * (1.0 - lam32)
        return out, targets


def _paste(x, other, box):
    """x with each sample's box (y1, y2, x1, x2) taken from `other`."""
    h, w = x.shape[-2:]
    y1, y2, x1, x2 = box.unbind(1)
    rr, cc = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_box = ((rr >= y1[:, None]) & (rr < y2[:, None]))[:, :, None] & ((cc >= x1[:, None]) & (cc < x2[:, None]))[
        :, None, :
    ]
    return torch.where(in_box.unsqueeze(1), other, x)


def _lerp(x, other, lam):
    """Mixup: lam x + (1 - lam) partner, as torch.lerp(partner, x, lam) (lam = 1: x exactly)."""
    return torch.lerp(other, x, lam.to(x.dtype).view(-1, 1, 1, 1))


def dominant_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Training accuracy with soft targets: the prediction equals the target's largest class (for a
    mixed sample the label with the larger share; an exact tie counts the lower class index)."""
    return (logits.argmax(1) == targets.argmax(1)).sum()


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy: mean over the batch of -sum(targets * log_softmax(logits))."""
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()

