"""Image files in class folders (torchvision ImageFolder layout), streamed by DataLoader workers.

    <root>/train/<class>/*.jpg      required (or class folders directly under <root>)
    <root>/val/<class>/*.jpg        optional official validation split
    <root>/test/<class>/*.jpg       optional test split

With only class folders under <root>, data.split carves train/val/test from them (seeded).
With train/ and val/ but no test/, all of train/ trains and val/ is the per-epoch validation and
the final evaluation (torchvision's and timm's references); data.carve_val=true carves validation
from train/ by data.val_fraction instead and makes val/ the test split.

The file list is indexed once (folder_index.py): the ranks divide the per-file check (its header
and, for JPEG/PNG, its end marker) among them, and restarts read the index. An empty, truncated or
non-image file is an error naming it, or, with data.skip_bad_images=true, it is left out (the same
files on every rank) and counted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from distcls.config import DataConfig
from distcls.data import folder_index
from distcls.data.file_source import FileSource, crop_policy
# the walk's rules live there
from distcls.data.folder_index import EXTENSIONS, class_folders, image_files  # noqa: F401
from distcls.data.datasets.registry import register_dataset
from distcls.data.sample_table import SampleTable
from distcls.data.sources import RawDataset
from distcls.errors import UserError
from distcls.spec import printable_name

def _check_classes(folder: Path, classes: list[str], labels: np.ndarray, skipped: int) -> None:
    """Every class of train/ holds at least one usable image, and there are at least 2 classes."""
    if len(classes) < 2:
        raise UserError(f"{folder} holds one class folder ({classes[0]}); a classifier needs at least 2 classes, "
                        f"each in its own folder {folder}/<class>/")
    counts = np.bincount(labels, minlength=len(classes))
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if empty:
        why = " usable" if skipped else ""
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise UserError(
            f"class folder {folder / empty[0]}{more} holds no{why} images ({', '.join(sorted(EXTENSIONS))}); "
            "add its images or remove the folder (a class without training images cannot be learned)"
        )


def _check_no_new_classes(folder: Path, found: list[str], classes: list[str]) -> None:
    """A val/ or test/ class folder that train/ lacks would be dropped silently: an error instead."""
    new = sorted(set(found) - set(classes))
    if new:
        more = f" (and {len(new) - 1} more)" if len(new) > 1 else ""
        raise UserError(f"class folder {folder / new[0]}{more} has no counterpart in the training classes; "
                        f"add {new[0]}/ to the training folder, or remove it from {folder}")


def _usable(index: folder_index.FolderIndex, split: str, folder: Path, skip_bad: bool, skipped: list) -> SampleTable:
    """The split's files less the bad ones (skip_bad), or the error naming a bad one."""
    table = index.source_pairs(split)
    if not len(table):
        raise UserError(
            f"no images ({', '.join(sorted(EXTENSIONS))}) found under {folder}/<class>/; put each class's images in "
            "its own folder"
        )
    bad = [f"{table.path(i)}: {why}" for i, why in index.bad.get(split, {}).items()]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        again = (
            f"; the index {index.read_from} says so: a file replaced in place under the same name is not seen, index "
            f"again with `python -m distcls.data.index {index.root} --rebuild`"
            if index.read_from
            else ""
        )
        raise UserError(
            f"image file {bad[0]}{more}; delete or replace it, or set data.skip_bad_images=true to leave such files "
            f"out{again}"
        )
    skipped.extend(bad)
    if bad:
        table = table.select([i for i in range(len(table)) if i not in index.bad[split]])
    if not len(table):
        raise UserError(f"every image under {folder} is unreadable; nothing to train on")
    return table


# training images whose size is read (their headers only) to see whether the training size upscales them
SIZE_SAMPLE = 32


def _upscaling(samples: SampleTable, train_size: int) -> str:
    """A warning when the training size is more than twice the median shorter side of a few training
    images (evenly spaced, headers only): they would be upscaled, at a cost and with no more detail."""
    from PIL import Image
    sides = []
    for i in np.linspace(0, len(samples) - 1, num=min(SIZE_SAMPLE, len(samples)), dtype=np.int64):
        try:
            with Image.open(samples.path(int(i))) as img:
                sides.append(min(img.size))
        except Exception:  # a file the check let through but Pillow cannot open: decoding will name it
            continue
    if not sides:
        return ""
    median = float(np.median(sides))
    if train_size <= 2 * median:
        return ""
    return (
        f"warning: the training size {train_size} px is {train_size / median:.1f}x the median shorter side "
        f"({median:.0f} px) of {len(sides)} sampled training images: they are upscaled (slower, no more detail); set "
        "data.image_size (image folders default to 224)"
    )


@register_dataset("imagefolder")
def build_imagefolder(cfg: DataConfig) -> RawDataset:
    """Collective under a launcher (the file check is divided among the ranks: folder_index.py)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(
            f"imagefolder root {root} does not exist; put images in {root}/train/<class>/ (and optionally val/, test/) "
            "or set data.root"
        )
    size, channels, policy = crop_policy(cfg)
    train_size = policy.train_size
    notes = []
    # data.index: set by the user, or by build_data for a training run
    where = folder_index.location(root, cfg.index, None)
    index = folder_index.load_or_build(root, where, note=notes.append, save_to=where if cfg.index is not None else None)
    train_dir = root / index.train_dir
    classes = index.classes
    if not classes:
        raise UserError(f"no class folders in {train_dir}; expected {train_dir}/<class>/<image files>")
    skipped, sources = [], {}
    for split in folder_index.SPLITS:
        if split not in index.tables:
            continue
        folder = train_dir if split == "train" else root / split
        if split != "train":
            _check_no_new_classes(folder, index.split_classes.get(split, []), classes)
        table = _usable(index, split, folder, cfg.skip_bad_images, skipped)
        if split == "train":
            _check_classes(folder, classes, table.labels, len(skipped))
        sources[split] = FileSource(table, size, channels, policy, cfg.skip_bad_images)
    train, val, test = sources["train"], sources.get("val"), sources.get("test")
    upscaled = _upscaling(train.samples, train_size)
    if upscaled:
        notes.append(upscaled)
    if test is None and val is not None:
        if cfg.carve_val:  # validation carved from train/ (make_splits), val/ the test split
            test, val = val, None
            notes.append(
                f"image folder {root}: validation carved from train/ (data.val_fraction={cfg.val_fraction}), val/ is "
                "the test split (data.carve_val=true)"
            )
        else:  # torchvision's and timm's references: all of train/ trains, val/ validates every epoch and at the end
            test = val
            notes.append(
                f"image folder {root}: all of train/ trains; val/ is the validation of every epoch and the final "
                "evaluation (data.carve_val=false)"
            )
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.449,), (0.226,))
    # The class names a person reads (console, plots, predict, JSON); the files keep their own names.
    return RawDataset(
        train=train,
        test=test,
        val=val,
        class_names=[printable_name(c) for c in classes],
        mean=mean,
        std=std,
        skipped_files=tuple(skipped),
        notes=tuple(notes),
    )
