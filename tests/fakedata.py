"""Small datasets written in each dataset's OFFICIAL on-disk format (no internet here).

Images are learnable: each class is a fixed pattern plus noise, so short runs can show learning.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def _images(n: int, classes: int, shape: tuple, seed: int):
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(classes,) + shape)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    noise = rng.normal(0, 30, size=(n,) + shape)
    return np.clip(protos[labels] + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_cifar10(root, per_batch: int = 20, test: int = 30) -> Path:
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        x, y = _images(per_batch, 10, (3, 32, 32), seed=i)
        _dump(
            folder / f"data_batch_{i}",
            {
                "batch_label": f"training batch {i} of 5",
                "labels": y.tolist(),
                "data": x.reshape(len(x), -1),
                "filenames": [f"img{j}.png" for j in range(len(x))],
            },
        )
    x, y = _images(test, 10, (3, 32, 32), seed=99)
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": y.tolist(),
            "data": x.reshape(len(x), -1),
            "filenames": [f"t{j}.png" for j in range(len(x))],
        },
    )
    _dump(
        folder / "batches.meta",
        {
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_cases_per_batch": per_batch,
            "num_vis": 3072,
        },
    )
    return folder


def write_cifar100(root, train: int = 200, test: int = 100) -> Path:
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", train, 1), ("test", test, 2)):
        x, y = _images(n, 100, (3, 32, 32), seed=seed)
        _dump(
            folder / name,
            {
                "filenames": [f"{j}.png" for j in range(n)],
                "batch_label": name,
                "fine_labels": y.tolist(),
                "coarse_labels": (y // 5).tolist(),
                "data": x.reshape(n, -1),
            },
        )
    _dump(
        folder / "meta",
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]},
    )
    return folder


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(root, folder: str = "MNIST", train: int = 120, test: int = 50, compress: bool = False) -> Path:
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", train, 3), ("t10k", test, 4)):
        x, y = _images(n, 10, (28, 28), seed=seed)
        _idx(raw / f"{prefix}-images-idx3-ubyte", x, compress)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", y, compress)
    return raw


def write_imagefolder(
    root, classes=("daisy", "roses", "tulips"), per_class: int = 8, size: int = 40, layout: str = "flat"
) -> Path:
    """layout 'flat': <root>/<class>/*.jpg; 'split': <root>/{train,val}/<class>/*.png."""
    from PIL import Image

    root = Path(root)
    dirs = {"": per_class} if layout == "flat" else {"train": per_class, "val": max(2, per_class // 2)}
    for sub, n in dirs.items():
        x, y = _images(n * len(classes), len(classes), (size, size + 8, 3), seed=len(sub) + 7)
        for j, (img, label) in enumerate(zip(x, y)):
            d = root / sub / classes[label] if sub else root / classes[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"img_{j:03d}.{'jpg' if layout == 'flat' else 'png'}")
    return root


def write_resnet_weights(path, arch: str = "resnet18", num_classes: int = 1000) -> Path:
    """A torchvision-layout state_dict file, standing in for the published pretrained weights."""
    import torch
    import torchvision

    torch.manual_seed(123)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def write_damaged_png(path, size: int = 24) -> Path:
    """A PNG whose header and IEND are intact but whose compressed pixels are zeroed:
    libpng reports an error on it, which crashed torchvision's decoder (SIGSEGV)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    i = data.find(b"IDAT")
    data[i + 8:i + 40] = bytes(32)
    path = Path(path)
    path.write_bytes(bytes(data))
    return path


def write_shards(folder, out, shard_size: int = 25) -> Path:
    """An image folder written as WebDataset shards by `python -m distcls.shard` (in this process)."""
    from distcls import shard

    assert shard.main([str(folder), str(out), "--shard-size", str(shard_size)]) == 0
    return Path(out)
