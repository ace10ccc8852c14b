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

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distcls.config import DataConfig
from distcls.data.registry import register_dataset
from distcls.data.file_source import CropPolicy, FileSource, default_eval_resize
from distcls.data.sources import RawDataset
from distcls.spec import printable_name
from distcls.errors import ConfigError, UserError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, in sorted order: FILES with an image extension.

    The one rule of image-folder data and of predict's directory walk: a directory named like an
    image (`x.jpg/`) is not an image (the files in it are), every name starting with "." is
    skipped, hidden files and folders alike, macOS's `._x.jpg` (AppleDouble metadata) among them,
    and symbolic links to folders are followed (torchvision's ImageFolder does).
    """
    found, seen = [], set()
    # Symbolic links to folders are followed, as torchvision's ImageFolder does (os.walk(followlinks=True));
    # each real folder is read once, so a link to an ancestor cannot loop.
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top) / f for f in files if not f.startswith(".") and os.path.splitext(f)[1].lower() in EXTENSIONS
                  and os.path.isfile(os.path.join(top, f))]
    return sorted(found)


def _classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(folder: Path, classes: list[str]) -> list:
    samples = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if class_dir.is_dir():
            samples += [(str(p), label) for p in image_files(class_dir)]
    if not samples:
        raise UserError(f"no images ({', '.join(sorted(EXTENSIONS))}) found under {folder}/<class>/; put each class's images in its own folder")
    return samples


def _check_classes(folder: Path, classes: list[str], samples: list, skipped: int) -> None:
    """Every class of train/ holds at least one usable image, and there are at least 2 classes."""
    if len(classes) < 2:
        raise UserError(f"{folder} holds one class folder ({classes[0]}); a classifier needs at least 2 classes, "
                        f"each in its own folder {folder}/<class>/")
    counts = [0] * len(classes)
    for _, label in samples:
        counts[label] += 1
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if empty:
        why = " usable" if skipped else ""
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise UserError(f"class folder {folder / empty[0]}{more} holds no{why} images ({', '.join(sorted(EXTENSIONS))}); "
                        "add its images or remove the folder (a class without training images cannot be learned)")


def _check_no_new_classes(folder: Path, classes: list[str]) -> None:
    """A val/ or test/ class folder that train/ lacks would be dropped silently: an error instead."""
    new = sorted(set(_classes(folder)) - set(classes))
    if new:
        more = f" (and {len(new) - 1} more)" if len(new) > 1 else ""
        raise UserError(f"class folder {folder / new[0]}{more} has no counterpart in the training classes; "
                        f"add {new[0]}/ to the training folder, or remove it from {folder}")


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
    size = cfg.eval_crop_size or cfg.image_size or 224  # the model's input size (evaluation)
    if cfg.eval_resize is not None and cfg.eval_resize < size:  # config.py checks the sizes it sees; here with the defaults
        raise ConfigError(f"data.eval_resize={cfg.eval_resize} is smaller than the evaluation crop {size} (data.eval_crop_size, "
                          f"else data.image_size, else 224): the center crop would not fit; set data.eval_resize >= {size} or a smaller data.eval_crop_size")
    train_size = cfg.train_crop_size or cfg.image_size or 224
    channels = cfg.channels or 3
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = _classes(train_dir)
    if train_dir == root:
        classes = [c for c in classes if c not in ("val", "test")]
    if not classes:
        raise UserError(f"no class folders in {train_dir}; expected {train_dir}/<class>/<image files>")
    aug = cfg.augment
    policy = CropPolicy(size, cfg.eval_resize or default_eval_resize(size),
                        (tuple(aug.scale), tuple(aug.ratio)) if aug.random_resized_crop else None, aug.hflip,
                        train_size, cfg.interpolation)
    skipped = []

    def source(folder: Path):
        if train_dir == root and folder != root or not folder.is_dir():
            return None
        if folder != train_dir:
            _check_no_new_classes(folder, classes)
        samples, bad = check_files(_scan(folder, classes), cfg.skip_bad_images)
        skipped.extend(bad)
        if not samples:
            raise UserError(f"every image under {folder} is unreadable; nothing to train on")
        if folder == train_dir:
            _check_classes(folder, classes, samples, len(bad))
        return FileSource(samples, size, channels, policy, cfg.skip_bad_images)

    train, val, test = source(train_dir), source(root / "val"), source(root / "test")
    if test is None and val is not None:
        test, val = val, None
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.449,), (0.226,))
    # The class names a person reads (console, plots, predict, JSON); the files keep their own names.
    return RawDataset(train=train, test=test, val=val, class_names=[printable_name(c) for c in classes], mean=mean, std=std, skipped_files=tuple(skipped))
