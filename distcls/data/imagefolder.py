"""Image files in class folders (torchvision ImageFolder layout), streamed by DataLoader workers.

    <root>/train/<class>/*.jpg      required (or class folders directly under <root>)
    <root>/val/<class>/*.jpg        optional official validation split
    <root>/test/<class>/*.jpg       optional test split

With only class folders under <root>, data.split carves train/val/test from them (seeded).
Without a test/ folder, val/ serves as the test split (ImageNet's convention) and validation
is carved from train by data.val_fraction.
"""
from __future__ import annotations

from pathlib import Path

from distcls.config import DataConfig
from distcls.data.registry import register_dataset
from distcls.data.sources import FileSource, RawDataset
from distcls.errors import UserError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def _classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(folder: Path, classes: list[str], size: int, channels: int) -> FileSource:
    samples = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if class_dir.is_dir():
            samples += [(str(p), label) for p in sorted(class_dir.rglob("*")) if p.suffix.lower() in EXTENSIONS]
    if not samples:
        raise UserError(f"no images ({', '.join(sorted(EXTENSIONS))}) found under {folder}/<class>/; put each class's images in its own folder")
    return FileSource(samples, size, channels)


@register_dataset("imagefolder")
def build_imagefolder(cfg: DataConfig) -> RawDataset:
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"imagefolder root {root} does not exist; put images in {root}/train/<class>/ (and optionally val/, test/) or set data.root")
    size = cfg.image_size or 224
    channels = cfg.channels or 3
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = _classes(train_dir)
    if train_dir == root:
        classes = [c for c in classes if c not in ("val", "test")]
    if not classes:
        raise UserError(f"no class folders in {train_dir}; expected {train_dir}/<class>/<image files>")
    train = _scan(train_dir, classes, size, channels)
    val = _scan(root / "val", classes, size, channels) if train_dir != root and (root / "val").is_dir() else None
    test = _scan(root / "test", classes, size, channels) if train_dir != root and (root / "test").is_dir() else None
    if test is None and val is not None:
        test, val = val, None
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.449,), (0.226,))
    return RawDataset(train=train, test=test, val=val, class_names=classes, mean=mean, std=std)
