"""Data: dataset registry -> seeded splits -> per-rank loaders -> batched preprocessing.

    datasets/     one module per on-disk format, each registering its builder (registry.py)
    transforms/   the two stages below, and keys.py: the one hash of every random choice
    sources.py file_source.py sample_table.py   what a dataset holds: tensors, or image files as flat arrays
    folder_index.py index.py   an image folder's file list, built once by the ranks together, and its command
    splits.py sampler.py loader.py   seeded splits, the global-batch sampler contract, per-rank loaders
    shard_plan.py shard_source.py shard_loader.py   WebDataset shards: order in streams, reading, loaders

The stage contract: what runs PER SAMPLE IN DATALOADER WORKERS is decode and geometry, for image
files only (transforms/images.py: decode, the keyed RandomResizedCrop or the evaluation resize and
center crop, and the training flip on the uint8 crop: file_source.CropPolicy, decided when the source
is built). Everything else runs PER BATCH ON THE TRAINING DEVICE, for every dataset
(transforms/augment.py's Preprocess: the padded crop, flip and rotation of in-memory data, the
policies, erasing, Mixup/CutMix, normalization), keyed by (seed, epoch, sample key) so that 1 and N
processes draw the same numbers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from distcls.config import Config
from distcls.data import folder_index
# importing registers the builders
from distcls.data.datasets import cifar, digits, imagefolder, mnist, shards, synthetic  # noqa: F401
from distcls.data.transforms.augment import Preprocess
from distcls.data.transforms.mix import Mix
from distcls.data.loader import Batch, BatchLoader, eval_loader, train_loader
from distcls.data.datasets.registry import DATASETS, register_dataset
from distcls.data.file_source import FileSource
from distcls.data.sources import RawDataset, SplitView, TensorSource
from distcls.data.splits import Splits, make_splits
from distcls.errors import ConfigError, UserError
from distcls.spec import DataSpec

__all__ = ["Batch", "BatchLoader", "DataSpec", "Data", "FileSource", "RawDataset", "SplitView", "TensorSource",
           "build_data", "data_spec", "register_dataset", "train_loader", "eval_loader", "Preprocess"]


@dataclass
class Data:
    splits: Splits
    spec: DataSpec
    preprocess: Preprocess
    skipped_files: tuple = ()  # bad image files left out before training (data.skip_bad_images=true)
    notes: tuple = ()  # what building it did, for the console (rank 0's words)


def data_spec(dataset: RawDataset, cfg: Config, normalization_from: Optional[str] = None) -> DataSpec:
    d = cfg.data
    channels = d.channels or dataset.train.channels
    size = d.eval_crop_size or d.image_size or dataset.train.size
    mean, std = (d.mean, d.std) if d.mean is not None else (dataset.mean, dataset.std)
    if len(mean) == 1 and channels == 3:
        mean, std = list(mean) * 3, list(std) * 3
    # the user set no mean/std: the images' channels are what to change
    if len(mean) != channels and normalization_from:
        raise ConfigError(
            f"{normalization_from} was trained on {len(mean)}-channel images, but data.name={d.name} gives "
            f"{channels}-channel images: set data.channels={len(mean)} (grayscale images are then repeated to RGB), or "
            "train without these weights"
        )
    if len(mean) != channels:
        raise ConfigError(
            f"data.mean/data.std have {len(mean)} values but the images have {channels} channels; give one per channel"
        )
    return DataSpec(channels, len(dataset.class_names), size, tuple(dataset.class_names), tuple(mean), tuple(std))


def check_labels(dataset: RawDataset, name: str) -> None:
    """Every label in [0, number of classes): a bad one would fail mid-training ("Target 200 is out of bounds")."""
    n = len(dataset.class_names)
    for split in ("train", "val", "test"):
        source = getattr(dataset, split)
        labels = source.labels if source is not None else None
        if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n):
            bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
            raise UserError(
                f"data.name={name}: the {split} split holds label {bad}, but the dataset has {n} classes (0..{n - 1}); "
                "fix the dataset's labels or its class names"
            )


def build_data(cfg: Config, normalization_from: Optional[str] = None, run_dir: Optional[Path] = None) -> Data:
    """Collective under a launcher (a download's barrier and broadcast, fetch.py; an image folder's
    divided file check, folder_index.py). `normalization_from`: where data.mean/std came from when
    the user set none (e.g. the pretrained weights' preprocessing,
    models.weights.with_pretrained_preprocessing), for the error that names it. `run_dir`: the
    training run's out_dir, where an image folder's index is kept when data.index names no file
    and no shared one exists (without it: the index is built in memory only)."""
    data_cfg = cfg.data
    if run_dir is not None and data_cfg.index is None and data_cfg.name == "imagefolder":
        data_cfg = dataclasses.replace(data_cfg, index=str(folder_index.location(Path(data_cfg.root), None, run_dir)))
    # the shards' counts, when none lie beside them
    if run_dir is not None and data_cfg.index is None and data_cfg.name == "webdataset":
        data_cfg = dataclasses.replace(data_cfg, index=str(Path(run_dir) / shards.DESCRIPTION))
    dataset = DATASETS.build(cfg.data.name, data_cfg)
    if not isinstance(dataset, RawDataset):
        raise UserError(
            f"data.name={cfg.data.name}: the builder returned {type(dataset).__name__}, not distcls.data.RawDataset"
        )
    check_labels(dataset, cfg.data.name)
    from_files = dataset.train.decoded_on_demand
    if cfg.data.augment.random_resized_crop and not from_files:
        raise ConfigError(
            "data.augment.random_resized_crop applies to image folders (data.name=imagefolder), not to in-memory "
            f"data.name={cfg.data.name}; use data.augment.crop_padding for those"
        )
    spec = data_spec(dataset, cfg, normalization_from)
    splits = make_splits(dataset, cfg.data, cfg.run.seed)
    # One owner per op, decided by the source: an image folder's workers flip (uint8 crop, same key), not the device.
    flipped_in_workers = from_files and getattr(getattr(dataset.train, "policy", None), "hflip", False)
    # Training keys index the train split's source: the per-epoch draw table covers all of them.
    num_keys = len(splits.train.source) * cfg.data.repeats  # copy j of sample i has key i + j * source size
    # FixRes: may differ from spec.image_size
    train_size = cfg.data.train_crop_size or cfg.data.image_size or dataset.train.size
    if from_files:
        train_size = dataset.train.policy.train_size or dataset.train.policy.size
    mix = Mix.from_config(cfg.data.mix, cfg.train.label_smoothing, spec.num_classes, train_size, cfg.run.seed, num_keys)
    pre = Preprocess.from_spec(
        spec,
        cfg.data.augment,
        cfg.run.seed,
        num_keys=num_keys,
        mix=mix,
        train_size=train_size,
        interpolation=cfg.data.interpolation,
        flip_on_device=not flipped_in_workers,
    )
    return Data(splits, spec, pre, tuple(dataset.skipped_files), tuple(dataset.notes))
