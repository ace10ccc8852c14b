"""Data: dataset registry -> seeded splits -> per-rank loaders -> batched preprocessing."""
from __future__ import annotations

from dataclasses import dataclass

from distcls.config import Config
from distcls.data import cifar, digits, imagefolder, mnist, synthetic  # noqa: F401  (importing registers the builders)
from distcls.data.augment import Preprocess
from distcls.data.loader import Batch, BatchLoader, eval_loader, train_loader
from distcls.data.registry import DATASETS, register_dataset
from distcls.data.sources import DataSpec, FileSource, RawDataset, SplitView, TensorSource
from distcls.data.splits import Splits, make_splits
from distcls.errors import ConfigError, UserError

__all__ = ["Batch", "BatchLoader", "DataSpec", "Data", "FileSource", "RawDataset", "SplitView", "TensorSource",
           "build_data", "data_spec", "register_dataset", "train_loader", "eval_loader", "Preprocess"]


@dataclass
class Data:
    splits: Splits
    spec: DataSpec
    preprocess: Preprocess
    skipped_files: tuple = ()  # bad image files left out before training (data.skip_bad_images=true)


def data_spec(raw: RawDataset, cfg: Config) -> DataSpec:
    d = cfg.data
    channels = d.channels or raw.train.channels
    size = d.image_size or raw.train.size
    mean, std = (d.mean, d.std) if d.mean is not None else (raw.mean, raw.std)
    if len(mean) == 1 and channels == 3:
        mean, std = list(mean) * 3, list(std) * 3
    if len(mean) != channels:
        raise ConfigError(f"data.mean/data.std have {len(mean)} values but the images have {channels} channels; give one per channel")
    return DataSpec(channels, len(raw.class_names), size, tuple(raw.class_names), tuple(mean), tuple(std))


def build_data(cfg: Config) -> Data:
    builder = DATASETS.get(cfg.data.name)
    raw = builder(cfg.data)
    if not isinstance(raw, RawDataset):
        raise UserError(f"data.name={cfg.data.name}: the builder returned {type(raw).__name__}, not distcls.data.RawDataset")
    streaming = raw.train.streaming
    if cfg.data.augment.random_resized_crop and not streaming:
        raise ConfigError(f"data.augment.random_resized_crop applies to image folders (data.name=imagefolder), not to in-memory data.name={cfg.data.name}; "
                          "use data.augment.crop_padding for those")
    spec = data_spec(raw, cfg)
    splits = make_splits(raw, cfg.data, cfg.run.seed)
    pre = Preprocess(spec.channels, spec.image_size, spec.mean, spec.std, cfg.data.augment, cfg.run.seed)
    return Data(splits, spec, pre, tuple(raw.skipped_files))
