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


def check_labels(raw: RawDataset, name: str) -> None:
    """Every label in [0, number of classes): a bad one would fail mid-training ("Target 200 is out of bounds")."""
    n = len(raw.class_names)
    for split in ("train", "val", "test"):
        source = getattr(raw, split)
        labels = source.labels if source is not None else None
        if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n):
            bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
            raise UserError(f"data.name={name}: the {split} split holds label {bad}, but the dataset has {n} classes (0..{n - 1}); "
                            "fix the dataset's labels or its class names")


def build_data(cfg: Config) -> Data:
    raw = DATASETS.build(cfg.data.name, cfg.data)
    if not isinstance(raw, RawDataset):
        raise UserError(f"data.name={cfg.data.name}: the builder returned {type(raw).__name__}, not distcls.data.RawDataset")
    check_labels(raw, cfg.data.name)
    spec = data_spec(raw, cfg)
    splits = make_splits(raw, cfg.data, cfg.run.seed)
    pre = Preprocess(spec.channels, spec.image_size, spec.mean, spec.std, cfg.data.augment, cfg.run.seed)
    return Data(splits, spec, pre)
