"""Data: dataset registry -> seeded splits -> per-rank loaders -> batched preprocessing."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from distcls import weights

from distcls.config import Config
from distcls.data import cifar, digits, imagefolder, mnist, synthetic  # noqa: F401  (importing registers the builders)
from distcls.data.augment import Preprocess
from distcls.data.mix import Mix
from distcls.data.loader import Batch, BatchLoader, eval_loader, train_loader
from distcls.data.registry import DATASETS, register_dataset
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


def data_spec(dataset: RawDataset, cfg: Config) -> DataSpec:
    d = cfg.data
    channels = d.channels or dataset.train.channels
    size = d.eval_crop_size or d.image_size or dataset.train.size
    mean, std = (d.mean, d.std) if d.mean is not None else (dataset.mean, dataset.std)
    if len(mean) == 1 and channels == 3:
        mean, std = list(mean) * 3, list(std) * 3
    if len(mean) != channels:
        raise ConfigError(f"data.mean/data.std have {len(mean)} values but the images have {channels} channels; give one per channel")
    return DataSpec(channels, len(dataset.class_names), size, tuple(dataset.class_names), tuple(mean), tuple(std))


def check_labels(dataset: RawDataset, name: str) -> None:
    """Every label in [0, number of classes): a bad one would fail mid-training ("Target 200 is out of bounds")."""
    n = len(dataset.class_names)
    for split in ("train", "val", "test"):
        source = getattr(dataset, split)
        labels = source.labels if source is not None else None
        if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n):
            bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
            raise UserError(f"data.name={name}: the {split} split holds label {bad}, but the dataset has {n} classes (0..{n - 1}); "
                            "fix the dataset's labels or its class names")


def with_pretrained_preprocessing(cfg: Config, pretrained: Optional[str] = None) -> Config:
    """torchvision weights bring their own preprocessing (mean/std, crop and resize sizes);
    keys the config leaves null take those values, keys it sets win. `pretrained` (default
    model.pretrained): the weights a checkpoint was trained from, for evaluate/predict/export,
    which restore the checkpoint's weights instead (the file need not exist any more)."""
    if pretrained is None:  # training: the file must be there (resolve says where to put it)
        if not (cfg.model.pretrained or "").startswith(weights.PREFIX):
            return cfg
        w = weights.resolve(cfg.model.pretrained)
    else:
        w = weights.preprocessing(pretrained)
        if w is None:
            return cfg
    d = cfg.data
    norm = {"mean": list(w.mean), "std": list(w.std)} if d.mean is None and w.mean is not None else {}
    size = {"image_size": w.crop_size} if d.image_size is None and w.crop_size else {}
    # The weights' resize belongs to their crop: only when the evaluation crop is theirs (else
    # e.g. data.eval_crop_size=288 got resize 232 and a zero-padded border).
    eval_crop = d.eval_crop_size or d.image_size
    resize = ({"eval_resize": w.resize_size} if d.eval_resize is None and w.resize_size
              and (eval_crop is None or eval_crop == w.crop_size) else {})
    return dataclasses.replace(cfg, data=dataclasses.replace(d, **norm, **size, **resize))


def build_data(cfg: Config) -> Data:
    """Collective under torchrun when data.download=true (fetch.py: a barrier and a broadcast)."""
    set_by_user = cfg.data
    cfg = with_pretrained_preprocessing(cfg)
    dataset = DATASETS.build(cfg.data.name, cfg.data)
    if not isinstance(dataset, RawDataset):
        raise UserError(f"data.name={cfg.data.name}: the builder returned {type(dataset).__name__}, not distcls.data.RawDataset")
    channels = cfg.data.channels or dataset.train.channels
    if set_by_user.mean is None and cfg.data.mean is not None and len(cfg.data.mean) != channels:
        # the normalization came with the weights (the user set none): the images' channels are what to change
        raise ConfigError(f"model.pretrained={cfg.model.pretrained} was trained on {len(cfg.data.mean)}-channel images, but data.name={cfg.data.name} "
                          f"gives {channels}-channel images: set data.channels={len(cfg.data.mean)} (grayscale images are then repeated "
                          "to RGB), or train without these weights")
    check_labels(dataset, cfg.data.name)
    from_files = dataset.train.decoded_on_demand
    if cfg.data.augment.random_resized_crop and not from_files:
        raise ConfigError(f"data.augment.random_resized_crop applies to image folders (data.name=imagefolder), not to in-memory data.name={cfg.data.name}; "
                          "use data.augment.crop_padding for those")
    spec = data_spec(dataset, cfg)
    splits = make_splits(dataset, cfg.data, cfg.run.seed)
    # Image folders flip in the DataLoader workers (on the uint8 crop, same key): not again on the device.
    flipped_in_workers = from_files and getattr(getattr(dataset.train, "policy", None), "hflip", False)
    augment = dataclasses.replace(cfg.data.augment, hflip=False) if flipped_in_workers else cfg.data.augment
    # Training keys index the train split's source: the per-epoch draw table covers all of them.
    num_keys = len(splits.train.source) * cfg.data.repeats  # copy j of sample i has key i + j * source size
    train_size = cfg.data.train_crop_size or cfg.data.image_size or dataset.train.size  # FixRes: may differ from spec.image_size
    if from_files:
        train_size = dataset.train.policy.train_size or dataset.train.policy.size
    mix = Mix.from_config(cfg.data.mix, cfg.train.label_smoothing, spec.num_classes, train_size, cfg.run.seed, num_keys)
    pre = Preprocess.from_spec(spec, augment, cfg.run.seed, num_keys=num_keys, mix=mix,
                               train_size=train_size, interpolation=cfg.data.interpolation)
    return Data(splits, spec, pre, tuple(dataset.skipped_files))
