"""`data.gpu_decode=true`: JPEG batches decoded on the CUDA device (nvJPEG via torchvision.io.decode_jpeg).

The DataLoader workers only read the files' bytes (other formats they decode on the CPU as
usual); the training process decodes the batch's JPEGs in one call on the GPU and does the crop
and resize there, with the same keyed crop boxes as the CPU path (so a run's samples and
augmentation do not depend on this option; pixel values may differ by resampling rounding).
A batch that fails to decode is decoded file by file to name the bad file.

NOT MEASURED in this repository yet (no GPU was available when it was written).
"""
from __future__ import annotations

import torch

from distcls.data.transforms.images import BadImage, check_pixels, sniff
from distcls.data.transforms.images import _tv_decode_jpeg as decode_jpeg
from distcls.data.transforms.images import ImageReadMode
from distcls.runtime.copies import host_to_device
from distcls.errors import first_line


def read_item(source, index: int, train: bool, seed: int, epoch: int):
    """Worker side: ("jpeg", bytes, label, index, path), or a CPU-decoded ("image", tensor, ...)/("bad", message,
    ...)."""
    path, label = source.samples[index]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return "bad", f"image {path} is unreadable ({exc.strerror or exc})", label, index, path
    if sniff(data[:16]) == "jpeg":
        try:
            check_pixels(data, path)
        except BadImage as exc:
            return "bad", str(exc), label, index, path
        return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), label, index, path
    img, label, index, bad = source.load(index, train, seed, epoch)
    return ("bad", bad, label, index, path) if img is None else ("image", img, label, index, path)


def collate(items):
    return items  # variable-sized byte tensors: the training process assembles the batch


def _decode_each(data: list, paths: list, mode, device) -> list:
    out = []
    for d, path in zip(data, paths):
        try:
            out.append(decode_jpeg(d, mode=mode, device=device))
        except RuntimeError as exc:
            out.append(BadImage(f"image {path} cannot be decoded on the GPU ({first_line(exc)})"))
    return out


def assemble(items, source, train: bool, seed: int, epoch: int, device: torch.device):
    """Training-process side: (uint8 [B, C, size, size] on device, labels, keys, [bad-file messages])."""
    mode = ImageReadMode.RGB if source.channels == 3 else ImageReadMode.GRAY
    jpeg = [i for i, it in enumerate(items) if it[0] == "jpeg"]
    decoded = {}
    if jpeg:
        data, paths = [items[i][1] for i in jpeg], [items[i][4] for i in jpeg]
        try:
            images = decode_jpeg(data, mode=mode, device=device)
        except RuntimeError:
            images = _decode_each(data, paths, mode, device)
        decoded = dict(zip(jpeg, images))
    out, labels, keys, bad = [], [], [], []
    for i, (kind, payload, label, index, _path) in enumerate(items):
        if kind == "bad":
            bad.append(payload)
            continue
        if kind == "image":
            img = payload.to(device, non_blocking=True)
        else:
            full = decoded[i]
            if isinstance(full, BadImage):
                bad.append(str(full))
                continue
            img = source.policy.apply(full, train, seed, epoch, index)
        out.append(img)
        labels.append(label)
        keys.append(index)
    if not out:
        return None, None, None, bad
    return (torch.stack(out), host_to_device(torch.tensor(labels, dtype=torch.long), device),
            torch.tensor(keys, dtype=torch.long), bad)
