"""Image files in class folders (torchvision ImageFolder layout), streamed by DataLoader workers.

    <root>/train/<class>/*.jpg      required (or class folders directly under <root>)
    <root>/val/<class>/*.jpg        optional official validation split
    <root>/test/<class>/*.jpg       optional test split

With only class folders under <root>, data.split carves train/val/test from them (seeded).
Without a test/ folder, val/ serves as the test split (ImageNet's convention) and validation
is carved from train by data.val_fraction.

Before training, every file's header (and, for JPEG/PNG, its end marker) is checked, on every
rank alike: an empty, truncated or non-image file is an error naming it, or, with
data.skip_bad_images=true, it is left out (the same files on every rank) and counted.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distcls.config import DataConfig
from distcls.data.registry import register_dataset
from distcls.data.file_source import CropPolicy, FileSource, default_eval_resize
from distcls.data.sources import RawDataset
from distcls.errors import UserError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def _classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(folder: Path, classes: list[str]) -> list:
    samples = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if class_dir.is_dir():
            samples += [(str(p), label) for p in sorted(class_dir.rglob("*")) if p.suffix.lower() in EXTENSIONS]
    if not samples:
        raise UserError(f"no images ({', '.join(sorted(EXTENSIONS))}) found under {folder}/<class>/; put each class's images in its own folder")
    return samples


def check_files(samples: list, skip_bad: bool) -> tuple[list, list]:
    """(usable samples, ["path: reason", ...] of bad ones); without skip_bad a bad file is an error."""
    with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound: two small reads per file
        from distcls.data.images import check_image_file  # torchvision.io: imported only for image folders
        reasons = list(pool.map(check_image_file, [path for path, _ in samples]))
    bad = [f"{path}: {why}" for (path, _), why in zip(samples, reasons) if why]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"image file {bad[0]}{more}; delete or replace it, or set data.skip_bad_images=true to leave such files out")
    return [s for s, why in zip(samples, reasons) if not why], bad


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
    aug = cfg.augment
    policy = CropPolicy(size, cfg.eval_resize or default_eval_resize(size),
                        (tuple(aug.scale), tuple(aug.ratio)) if aug.random_resized_crop else None, aug.hflip)
    skipped = []

    def source(folder: Path):
        if train_dir == root and folder != root or not folder.is_dir():
            return None
        samples, bad = check_files(_scan(folder, classes), cfg.skip_bad_images)
        skipped.extend(bad)
        if not samples:
            raise UserError(f"every image under {folder} is unreadable; nothing to train on")
        return FileSource(samples, size, channels, policy, cfg.skip_bad_images)

    train, val, test = source(train_dir), source(root / "val"), source(root / "test")
    if test is None and val is not None:
        test, val = val, None
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.449,), (0.226,))
    return RawDataset(train=train, test=test, val=val, class_names=classes, mean=mean, std=std, skipped_files=tuple(skipped))
