"""Pixel arrays to the model's format: the one channel matcher and the one square resize.

Used per image in the DataLoader workers (images.py: decoded files, their crops) and per batch in
the training process (augment.Preprocess: in-memory data of another size or channel count), so
that both stages convert alike. Pure torch: importing it loads no torchvision.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")


def match_channels(t: torch.Tensor, channels: int, gray_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The one channel matcher: [..., C, H, W] (one image or a batch) with `channels` channels (1 or 3).
    Gray+alpha and RGBA lose the alpha, gray is copied to 3 channels, RGB becomes gray by GRAY_WEIGHTS:
    uint8 in, rounded uint8 out (a decoded file, in float64); float in, float out in its own dtype (a
    batch; `gray_weights`: those weights already on its device as [3, 1, 1], else made here). A
    count it cannot convert comes back unchanged (the callers say what is wrong)."""
    c = t.shape[-3]
    if c in (2, 4) and c != channels:  # gray+alpha, RGBA: drop alpha
        t, c = t[..., :-1, :, :], c - 1
    if c == channels:
        return t
    if c == 1 and channels == 3:
        return t.expand(*t.shape[:-3], 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        if t.is_floating_point():
            w = (
                gray_weights
                if gray_weights is not None
                else torch.tensor(GRAY_WEIGHTS, dtype=t.dtype, device=t.device).view(3, 1, 1)
            )
            return (t * w).sum(dim=-3, keepdim=True)
        w = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64, device=t.device).view(3, 1, 1)
        return (t.double() * w).sum(-3, keepdim=True).round_().to(torch.uint8)
    return t


def resize_square(t: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The one square resize: [C, H, W] or [B, C, H, W], uint8 or float, to size x size, antialiased
    (torchvision's Resize([size, size])); t itself when it has that size already. uint8 stays uint8
    (rounded); on the CPU its bilinear takes torch's vectorized channels_last kernel (~2x NCHW's)."""
    if tuple(t.shape[-2:]) == (size, size):
        return t
    batch = t if t.dim() == 4 else t[None]
    if t.dtype == torch.uint8 and t.device.type == "cpu" and interpolation == "bilinear":
        out = F.interpolate(batch.contiguous(memory_format=torch.channels_last), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True).contiguous()
    elif t.dtype == torch.uint8:  # torchvision's rounding and clamping of the bicubic overshoot
        import torchvision.transforms.v2.functional as TF  # here: importing torchvision costs ~1 s
        out = TF.resize(batch, [size, size], interpolation=TF.InterpolationMode(interpolation), antialias=True)
    else:
        out = F.interpolate(batch, size=(size, size), mode=interpolation, align_corners=False, antialias=True)
    return out if t.dim() == 4 else out[0]
