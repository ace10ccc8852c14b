"""One typed config schema: YAML files, dot-path overrides, validation before anything runs.

The schema is a tree of frozen dataclasses. Its defaults ARE the default run (digits + cnn3 on
CPU in seconds); `configs/default.yaml` spells the same values out. Every key, type and range is
checked here, before any process group or dataset exists; a problem raises `ConfigError`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from distcls.errors import ConfigError


def _opt(default, help: str, **rules):
    """A schema field: default value, help text and validation rules (choices, min, max), and what a
    resume may do with it (`resume=`, see RESUME_KINDS; run/checks.py derives its refusals from it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


# What a changed key means for a resume (the field's `resume=`; run/checks.py refuses such a change, naming why):
# position: the checkpoint's (epoch, step) counts samples of the seeded training order, which the key changes;
# best: the checkpoint's model EMA and best value mean what the saved value says; ema_rule: how its EMA averages;
# schedule (every key of the SCHEDULE_SECTIONS): the optimizer state and lr schedule come from the checkpoint.
RESUME_KINDS = ("position", "best", "ema_rule", "schedule")
SCHEDULE_SECTIONS = ("optim", "sched")


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = _opt(
        0, "random crop of the original size after zero-padding by this many pixels (0 = off)", min=0
    )
    hflip: bool = _opt(False, "random horizontal flip with probability 0.5")
    rotation_deg: float = _opt(0.0, "random rotation in [-deg, +deg] (0 = off)", min=0.0, max=180.0)
    random_resized_crop: bool = _opt(
        False,
        "imagefolder: RandomResizedCrop to data.image_size (a random area fraction and aspect ratio, then resize), "
        "keyed by (seed, epoch, sample)",
    )
    scale: list = _opt([0.08, 1.0], "RandomResizedCrop: [min, max] fraction of the image area (torchvision's default)")
    ratio: list = _opt(
        [0.75, 1.3333333333333333], "RandomResizedCrop: [min, max] aspect ratio w/h (torchvision's default, 3/4..4/3)"
    )
    policy: str = _opt(
        "none",
        "automatic augmentation policy, batched on the device and keyed by (seed, epoch, sample): trivialaugment "
        "(torchvision TrivialAugmentWide), randaugment (RandAugment(num_ops, magnitude)), autoaugment (AutoAugment, "
        "ImageNet policy)",
        choices=["none", "trivialaugment", "randaugment", "autoaugment"],
    )
    num_ops: int = _opt(2, "randaugment: ops applied in sequence per image", min=0, max=16)
    magnitude: int = _opt(9, "randaugment: magnitude bin of every op, in [0, num_magnitude_bins)", min=0)
    num_magnitude_bins: int = _opt(
        31, "trivialaugment/randaugment: number of magnitude bins (torchvision's default 31)", min=2
    )
    policy_interpolation: str = _opt(
        "bilinear",
        "interpolation of the policies' shear/translate/rotate (torchvision's reference passes its "
        "--interpolation, default bilinear; the transform's own default: nearest)",
        choices=["bilinear", "bicubic", "nearest"],
    )
    erase_prob: float = _opt(
        0.0, "random erasing probability per image (torchvision RandomErasing p; 0 = off), applied after normalization",
        min=0.0, max=1.0,
    )
    erase_scale: list = _opt(
        [0.02, 0.33], "random erasing: [min, max] fraction of the image area (torchvision's default)"
    )
    erase_ratio: list = _opt([0.3, 3.3], "random erasing: [min, max] aspect ratio h/w (torchvision's default)")
    erase_value: float = _opt(
        0.0,
        "random erasing: the value written, in normalized units (0 = the dataset mean, torchvision's value=0 after "
        "Normalize)",
    )


@dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = _opt(
        0.0, "Mixup: lambda ~ Beta(alpha, alpha) (0 = off; torchvision's reference --mixup-alpha 0.2)", min=0.0
    )
    cutmix_alpha: float = _opt(
        0.0,
        "CutMix: lambda ~ Beta(alpha, alpha), a box of area 1 - lambda pasted from the partner (0 = off; "
        "--cutmix-alpha 1.0)",
        min=0.0,
    )
    prob: float = _opt(1.0, "probability that a pair is mixed at all (timm's mixup prob)", min=0.0, max=1.0)
    switch_prob: float = _opt(
        0.5, "with both alphas on: probability of CutMix instead of Mixup (timm's switch_prob)", min=0.0, max=1.0
    )
    mode: str = _opt(
        "pair",
        "pair: samples 2i and 2i+1 of the global batch mix with each other, one lambda per pair (timm's 'pair'); elem: "
        "each sample draws its own lambda and mixes in that same neighbour",
        choices=["pair", "elem"],
    )


@dataclass(frozen=True)
class SyntheticConfig:
    train_samples: int = _opt(512, "training samples of the synthetic dataset", min=1, resume="position")
    test_samples: int = _opt(128, "test samples of the synthetic dataset", min=1, resume="position")
    num_classes: int = _opt(10, "classes of the synthetic dataset", min=2, resume="position")
    channels: int = _opt(3, "image channels of the synthetic dataset", choices=[1, 3])
    size: int = _opt(32, "image height and width of the synthetic dataset", min=4)


@dataclass(frozen=True)
class DataConfig:
    name: str = _opt(
        "digits",
        "digits | cifar10 | cifar100 | mnist | fashion_mnist | imagefolder | webdataset | synthetic | a registered "
        "name | "
        "'pkg.module:builder'",
        resume="position",
    )
    root: str = _opt("data", "directory that holds the dataset files (official on-disk format)")
    download: bool = _opt(False, "download a missing dataset through torchvision (needs internet)")
    image_size: Optional[int] = _opt(None, "resize images to this square size (null = the dataset's own size)", min=4)
    channels: Optional[int] = _opt(
        None, "force 1 (grayscale) or 3 (RGB) channels (null = the dataset's own)", choices=[None, 1, 3]
    )
    batch_size: int = _opt(
        64, "GLOBAL training batch, split evenly across ranks (and accum_steps)", min=1, resume="position"
    )
    eval_batch_size: Optional[int] = _opt(None, "global evaluation batch (null = batch_size)", min=1)
    num_workers: int = _opt(
        0, "DataLoader workers per rank for datasets decoded from files (imagefolder, webdataset)", min=0
    )
    prefetch_factor: int = _opt(4, "imagefolder, webdataset: batches each DataLoader worker decodes ahead", min=1)
    eval_resize: Optional[int] = _opt(
        None,
        "imagefolder evaluation: resize the shorter side to this, then center crop data.eval_crop_size (torchvision "
        "Resize + CenterCrop; null = eval crop/0.875, e.g. 256 for 224)",
        min=4,
    )
    train_crop_size: Optional[int] = _opt(
        None,
        "training image size (FixRes: e.g. 176 with eval_crop_size 224 and eval_resize 232; null = data.image_size)",
        min=4,
    )
    eval_crop_size: Optional[int] = _opt(
        None, "evaluation (and predict) image size, the model's input size (null = data.image_size)", min=4
    )
    interpolation: str = _opt(
        "bilinear",
        "resizing of crops and evaluation images, always antialiased (torchvision's --interpolation)",
        choices=["bilinear", "bicubic"],
    )
    skip_bad_images: bool = _opt(
        False,
        "imagefolder: leave out corrupt, empty or non-image files (warned, counted in summary.json) instead of "
        "stopping with an error that names them",
    )
    index: Optional[str] = _opt(
        None,
        "imagefolder: the file list's index (built once, read by restarts instead of walking and checking every file); "
        "null: ROOT/.distcls_index.npz when `python -m distcls.data.index ROOT` built one, else "
        "run.out_dir/data_index.npz. webdataset: where the shards' counts are kept when no shards.json lies beside "
        "them (null: run.out_dir/shards.json)",
    )
    train_shards: Optional[str] = _opt(
        None,
        "webdataset: the training shards, a brace pattern of tar files: a path, file:// or http(s):// URL, e.g. "
        "/data/in1k/train-{000000..001281}.tar; each sample an image (jpg/jpeg/png/webp) and its integer label (cls); "
        "a resume may read the same shards from elsewhere",
    )
    val_shards: Optional[str] = _opt(
        None,
        "webdataset: the validation shards (a pattern as data.train_shards): the per-epoch validation, and the "
        "final evaluation unless data.test_shards is set",
    )
    test_shards: Optional[str] = _opt(
        None, "webdataset: the test shards of the final evaluation (null: data.val_shards)"
    )
    shard_streams: int = _opt(
        16,
        "webdataset: the training order's streams, each reading whole shards in turn; a multiple of every world size "
        "the run will use, dividing data.batch_size (the order does not depend on the world size)",
        min=1,
        resume="position",
    )
    shuffle_window: int = _opt(
        1000,
        "webdataset: each stream's samples are shuffled within windows of this many (read, then given out in a seeded "
        "order; memory: this many encoded images per stream)",
        min=1,
        resume="position",
    )
    carve_val: Optional[bool] = _opt(
        None,
        "imagefolder with train/ and val/ (no test/): false = val/ is the per-epoch validation and the final "
        "evaluation, all of train/ trains (torchvision's and timm's references); true = validation carved from train/ "
        "by data.val_fraction, val/ the test split (distcls before this key); null: false, or what the resumed "
        "checkpoint used",
        resume="position",
    )
    gpu_decode: bool = _opt(
        False,
        "imagefolder on a CUDA device: decode JPEG batches on the GPU (torchvision.io.decode_jpeg(device='cuda')) and "
        "crop/resize there",
    )
    val_fraction: float = _opt(
        0.1,
        "fraction of the training set carved out (seeded) for validation (without an official test split: of all data, "
        "and 10% more is the test split)",
        min=0.0,
        max=0.8,
        resume="position",
    )
    split: Optional[list] = _opt(
        None,
        "[train, val, test] fractions: pool every official split and re-split (seeded), e.g. [0.8, 0.1, 0.1]",
        resume="position",
    )
    max_train_samples: Optional[int] = _opt(
        None, "use only the first N training samples after the split (null = all)", min=1, resume="position"
    )
    max_eval_samples: Optional[int] = _opt(None, "use only the first N val/test samples (null = all)", min=1)
    mean: Optional[list] = _opt(None, "per-channel normalization mean (null = the dataset's own statistics)")
    std: Optional[list] = _opt(None, "per-channel normalization std (null = the dataset's own statistics)")
    repeats: int = _opt(
        1,
        "repeated augmentation (torchvision --ra-reps): each global batch holds batch_size/repeats samples, each "
        "`repeats` times with its own augmentation key, the copies on different ranks; epochs keep their number of "
        "steps",
        min=1,
        resume="position",
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt(
        "cnn3",
        "cnn2 | lenet | cnn3 | convnet | resnet18 | resnet34 | resnet50 | torchvision:<classifier> (any of "
        "torchvision.models.list_models(module=torchvision.models), e.g. torchvision:convnext_tiny) | timm:<name> (any "
        "of "
        "timm.list_models(), the [timm] extra) | a registered name | 'pkg.module:builder'",
    )
    cifar_stem: bool = _opt(False, "ResNets: 3x3 stride-1 stem and no max-pool (for 32x32 inputs)")
    pretrained: Optional[str] = _opt(
        None,
        "weights to start from (transfer learning): a local state_dict/checkpoint file, or "
        "'torchvision:<WEIGHTS_ENUM>' (e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1) read from "
        "$TORCH_HOME/hub/checkpoints/ without network, or 'timm' (model.name=timm:<name>: timm's weights from the "
        "local Hugging Face cache)",
    )
    verify_weights: bool = _opt(
        True,
        "model.pretrained=torchvision:<WEIGHTS>: check the cached file's sha256 against the prefix in its "
        "name, as torchvision's downloader does (false: a file made by hand under that name)",
    )
    download: bool = _opt(
        False,
        "model.pretrained=torchvision:<WEIGHTS> missing from the hub cache: download it there through torch.hub "
        "(rank 0, its sha256 prefix checked) where the network allows it (false: never touch the network, an error "
        "says where to put the file)",
    )
    freeze: str = _opt(
        "none",
        "none: train every layer (fine-tuning); backbone: train only the classifier head, the backbone (and its "
        "BatchNorm statistics) stays fixed",
        choices=["none", "backbone"],
    )
    freeze_backbone: Optional[bool] = _opt(
        None, "deprecated spelling of model.freeze: true = backbone, false = none (null = not set)"
    )
    dropout: Optional[float] = _opt(
        None,
        "torchvision:<name> models whose builder takes it: the classifier's dropout probability (null = the builder's "
        "default)",
        min=0.0,
        max=1.0,
    )
    drop_path: Optional[float] = _opt(
        None,
        "torchvision:<name> models whose builder takes it: stochastic depth probability (stochastic_depth_prob; null = "
        "the builder's default)",
        min=0.0,
        max=1.0,
    )
    args: dict = _opt({}, "extra keyword arguments for the model builder")

    @property
    def frozen(self) -> bool:
        """The backbone is frozen (model.freeze=backbone, or the old model.freeze_backbone=true)."""
        return self.freeze == "backbone" or self.freeze_backbone is True


@dataclass(frozen=True)
class OptimConfig:
    name: str = _opt(
        "sgd",
        "optimizer (rmsprop: torch's RMSprop with torchvision's recipe settings, optim.alpha 0.9 and optim.eps 0.0316)",
        choices=["sgd", "adamw", "adam", "rmsprop"],
    )
    lr: float = _opt(0.05, "peak learning rate", min=0.0, exclusive_min=True)
    momentum: float = _opt(0.9, "SGD and RMSprop momentum", min=0.0, max=1.0)
    alpha: float = _opt(
        0.9, "RMSprop smoothing constant (torchvision's recipes: 0.9; torch's default 0.99)", min=0.0, max=1.0
    )
    eps: Optional[float] = _opt(
        None, "RMSprop/Adam/AdamW epsilon (null: torchvision's 0.0316 for rmsprop, torch's 1e-8 for adam and adamw)",
        min=0.0, exclusive_min=True,
    )
    nesterov: bool = _opt(False, "SGD Nesterov momentum")
    weight_decay: float = _opt(
        5e-4,
        "weight decay; with the next two keys null, of tensors with 2+ dims only (1-d tensors, biases and "
        "normalization parameters, get none); with either set, of every tensor those keys leave (torchvision's "
        "set_weight_decay)",
        min=0.0,
    )
    norm_weight_decay: Optional[float] = _opt(
        None,
        "weight decay of normalization layers' parameters (BatchNorm, LayerNorm, GroupNorm, ... found by module type), "
        "e.g. 0.0: torchvision's --norm-weight-decay (their biases take optim.bias_weight_decay when that is set)",
        min=0.0,
    )
    bias_weight_decay: Optional[float] = _opt(
        None,
        "weight decay of every parameter named bias, normalization layers' included: torchvision's "
        "--bias-weight-decay, e.g. 2e-5",
        min=0.0,
    )
    decay_rule: Optional[str] = _opt(
        None,
        "how the two keys above group the parameters: torchvision (set_weight_decay: bias_weight_decay for every bias, "
        "then norm_weight_decay for normalization layers, weight_decay for everything else, 1-d tensors included) or "
        "by_ndim (distcls before this key: the keys for 1-d tensors only, other biases and normalization parameters at "
        "none); null: torchvision, or what the resumed checkpoint used",
        choices=[None, "torchvision", "by_ndim"],
    )
    betas: list = _opt([0.9, 0.999], "Adam/AdamW betas")
    backbone_lr_scale: float = _opt(
        1.0,
        "fine-tuning: the backbone's learning rate is optim.lr times this (the classifier head gets optim.lr), e.g. "
        "0.1",
        min=0.0,
        exclusive_min=True,
    )


@dataclass(frozen=True)
class SchedConfig:
    name: str = _opt(
        "cosine",
        "learning-rate schedule after warmup: constant, cosine (to sched.min_lr), step (x gamma every step_epochs), "
        "multistep (x gamma at each of sched.milestones), exponential (x gamma per epoch), poly ((1 - progress) ** "
        "sched.power), onecycle "
        "(torch's OneCycleLR of the lr: its own warmup, sched.pct_start)",
        choices=["constant", "cosine", "step", "multistep", "exponential", "poly", "onecycle"],
    )
    interval: str = _opt(
        "step",
        "when the lr changes: step (every optimizer step, a smooth curve) or epoch (once per epoch, torchvision's "
        "references: warmup and schedule counted in epochs)",
        choices=["step", "epoch"],
    )
    warmup_epochs: float = _opt(
        0.0,
        "warmup length in epochs (fractions allowed with sched.interval=step; torchvision's --lr-warmup-epochs)",
        min=0.0,
    )
    warmup_method: str = _opt(
        "linear",
        "warmup: linear (from warmup_decay x lr up to lr) or constant (warmup_decay x lr throughout); "
        "torchvision's --lr-warmup-method",
        choices=["linear", "constant"],
    )
    warmup_decay: Optional[float] = _opt(
        None,
        "the warmup's starting factor of the lr (torchvision's --lr-warmup-decay); null: 0.01 "
        "(torchvision's default), except a linear warmup with interval=step, which ramps from 1/warmup steps",
        min=0.0,
        max=1.0,
    )
    step_epochs: int = _opt(30, "step schedule: multiply by gamma every this many epochs", min=1)
    gamma: float = _opt(0.1, "step, multistep and exponential schedules' factor", min=0.0, max=1.0)
    milestones: list = _opt(
        [30, 60, 90],
        "multistep schedule: the epochs (counted as sched.step_epochs is) where the lr is multiplied by gamma",
    )
    power: float = _opt(
        1.0, "poly schedule: the lr falls as (1 - progress) ** power to 0 at the end (torch's PolynomialLR)", min=0.0
    )
    pct_start: float = _opt(
        0.3, "onecycle: the fraction of the run spent rising to optim.lr (torch's OneCycleLR pct_start)", min=0.0,
        max=1.0, exclusive_min=True,
    )
    div_factor: float = _opt(25.0, "onecycle: it starts at optim.lr / div_factor", min=1.0)
    final_div_factor: float = _opt(1e4, "onecycle: it ends at the start lr / final_div_factor", min=1.0)
    min_lr: float = _opt(
        0.0,
        "cosine schedule floor: the lr training ends at (at most optim.lr; a backbone under optim.backbone_lr_scale "
        "ends at this times that)",
        min=0.0,
    )


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = _opt(
        False,
        "keep an exponential moving average of the weights (model EMA): evaluated beside them every epoch and at the "
        "end, saved in checkpoints, used by evaluate/predict/export --ema",
        resume="best",
    )
    decay: float = _opt(
        0.9999, "EMA decay per update: ema = decay * ema + (1 - decay) * weights", min=0.0, max=1.0, resume="ema_rule"
    )
    every_steps: int = _opt(
        32, "update the EMA every N optimizer steps (torchvision's --model-ema-steps)", min=1, resume="ema_rule"
    )
    warmup_copy: bool = _opt(
        True,
        "during sched.warmup_epochs the EMA copies the weights instead of averaging them (torchvision resets it while "
        "the lr warms up)",
        resume="ema_rule",
    )
    cadence: str = _opt(
        "run",
        "which steps update it: run (every every_steps-th optimizer step of the run) or epoch (torchvision's: the "
        "steps 0, every_steps, 2 x every_steps, ... of each epoch, and the first update after the warmup copies too)",
        choices=["run", "epoch"],
        resume="ema_rule",
    )
    adjust_decay: bool = _opt(
        False,
        "torchvision's decay adjustment: alpha = (1 - decay) * data.batch_size * every_steps / train.epochs (capped at "
        "1), decay = 1 - alpha; decay is then torchvision's --model-ema-decay",
        resume="ema_rule",
    )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _opt(15, "training epochs", min=1)
    amp: str = _opt("none", "mixed precision", choices=["none", "bf16", "fp16"])
    clip_grad_norm: Optional[float] = _opt(
        None, "clip the global gradient norm to this value (null = off)", min=0.0, exclusive_min=True
    )
    accum_steps: int = _opt(1, "gradient accumulation micro-steps per optimizer step", min=1)
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing", min=0.0, max=1.0)
    sync_bn: bool = _opt(False, "convert BatchNorm to SyncBatchNorm under DDP")
    channels_last: bool = _opt(False, "channels_last memory format")
    compile: bool = _opt(False, "torch.compile the model")
    cudnn_benchmark: bool = _opt(
        False,
        "cuDNN times its convolution algorithms per input shape and keeps the fastest (off under run.deterministic)",
    )
    tf32: Optional[bool] = _opt(
        None,
        "CUDA float32 matmuls and convolutions on TF32 tensor cores (true) or in full float32 (false); null = torch's "
        "defaults (TF32 for convolutions only)",
    )
    max_steps_per_epoch: Optional[int] = _opt(
        None, "stop each epoch after N optimizer steps (null = full epoch)", min=1, resume="position"
    )
    ema: EMAConfig = field(default_factory=EMAConfig)
    nonfinite: str = _opt(
        "abort",
        "non-finite loss (or, without fp16, gradient norm): skip the step (and count it) or abort",
        choices=["skip", "abort"],
    )
    max_skipped_fraction: float = _opt(
        0.5,
        "train.nonfinite=skip: stop (exit 4) when more than this fraction of an epoch's steps were skipped (1.0 = "
        "never stop)",
        min=0.0,
        max=1.0,
    )


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = _opt(1, "save a checkpoint every N epochs (0 = only last/best at the end)", min=0)
    every_steps: int = _opt(0, "also save a mid-epoch checkpoint every N optimizer steps (0 = off)", min=0)
    keep: int = _opt(3, "keep the last N epoch checkpoints besides last.pt and best.pt", min=0)
    best_metric: str = _opt(
        "val_acc",
        "what best.pt follows: val_acc (the weights' validation accuracy) or val_ema_acc (the EMA's, needs "
        "train.ema.enabled=true)",
        choices=["val_acc", "val_ema_acc"],
        resume="best",
    )


@dataclass(frozen=True)
class DistConfig:
    backend: str = _opt(
        "auto", "process-group backend (auto: nccl on GPU, gloo on CPU)", choices=["auto", "nccl", "gloo"]
    )
    device: str = _opt("auto", "auto: the rank's GPU when there is one, else CPU", choices=["auto", "cpu", "cuda"])
    timeout_s: int = _opt(600, "collective timeout: a dead rank ends the job after this many seconds", min=1)


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = _opt("runs/default", "directory of this run's outputs (rank 0 writes)")
    seed: int = _opt(
        0, "seed of model init, data split, shuffling and augmentation", min=0, max=2**32 - 1, resume="position"
    )
    deterministic: bool = _opt(False, "torch.use_deterministic_algorithms (also set by --debug)")


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = _opt(False, "log metrics to Weights & Biases from rank 0")
    project: str = _opt("distcls", "wandb project")
    entity: Optional[str] = _opt(None, "wandb entity (null = your default)")
    mode: str = _opt(
        "online",
        "wandb mode (WANDB_MODE in the environment wins; online without an API key falls back to offline)",
        choices=["online", "offline", "disabled"],
    )
    name: Optional[str] = _opt(None, "wandb run name (null = wandb's generated name)")
    tags: list = _opt([], "wandb run tags, e.g. [baseline, cifar10]")
    group: Optional[str] = _opt(None, "wandb group (e.g. one sweep or experiment)")
    notes: Optional[str] = _opt(None, "wandb run notes")


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = _opt(50, "print and record training loss every N optimizer steps (0 = per epoch only)", min=0)
    console: str = _opt(
        "auto", "auto: progress bars on a terminal, plain lines otherwise", choices=["auto", "rich", "plain"]
    )
    plots: bool = _opt(
        True, "write <out_dir>/plots/*.png at the end of training (python -m distcls.plot OUT_DIR makes them any time)"
    )
    tensorboard: bool = _opt(
        False,
        "write every metrics.jsonl record as TensorBoard scalars into <out_dir>/tensorboard/ from rank 0 (needs "
        "the tensorboard package; a resume drops what the stopped run logged after its checkpoint)",
    )
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


# Config files renamed after what they train; the old names (links in configs/) work until the next release.
RENAMED_CONFIGS = {
    "seed_a_cnn2_fashion_mnist.yaml": "fashion_mnist_cnn2.yaml",
    "seed_b_lenet_cifar10.yaml": "cifar10_lenet.yaml",
    "seed_c_cnn3_cifar10.yaml": "cifar10_cnn3.yaml",
    "seed_d_cifar10_cnn_bn_clip.yaml": "cifar10_cnn3_bn_clip.yaml",
    "seed_d_resnet18_flowers_transfer.yaml": "flowers_resnet18_transfer.yaml",
    "seed_d_resnet18_flowers_finetune.yaml": "flowers_resnet18_finetune.yaml",
    "seed_e_convnet_mnist.yaml": "mnist_convnet.yaml",
}


def renamed_note(path: Optional[str]) -> Optional[str]:
    """The note for a config file given by its old name (None for any other)."""
    name = Path(path).name if path else ""
    if name not in RENAMED_CONFIGS:
        return None
    return (
        f"{path} is now {Path(path).with_name(RENAMED_CONFIGS[name])} (named after what it trains); "
        "the old name works until the next release"
    )


def load(path: Optional[str] = None, overrides: typing.Sequence[str] = (), base: Optional[dict] = None) -> Config:
    """Defaults <- `base` tree <- YAML file <- `key.sub=value` overrides, validated."""
    tree = dataclasses.asdict(Config())
    if base is not None:  # e.g. a checkpoint's stored config: keys it lacks keep their defaults
        _deep_merge(tree, base, Config, prefix="")
    given = {}  # what the user wrote (YAML file, then overrides): dotted key -> value
    if path is not None:
        path = resolve_config_path(path)
        data = read_yaml(path)
        _deep_merge(tree, data, Config, prefix="")
        if not (isinstance(data.get("run"), dict) and "out_dir" in data["run"]):  # each config its own default out_dir
            tree["run"]["out_dir"] = f"runs/{Path(path).stem}"
        model = data.get("model")
        if isinstance(model, dict) and "freeze" in model:
            given["model.freeze"] = model["freeze"]
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key.split("."), value, Config)
        given[key] = value
    cfg = from_dict(tree)
    if given.get("model.freeze") == "none" and cfg.model.freeze_backbone is True:
        raise ConfigError("model.freeze=none contradicts model.freeze_backbone=true; model.freeze_backbone is the old "
                          "spelling of model.freeze: remove it and set model.freeze=none|backbone")
    return cfg


MAX_CONFIG_VALUES = 100_000  # after YAML alias expansion; a "billion laughs" file is refused before it is copied


def _expanded_size(data, limit: int) -> int:
    """How many values `data` holds once every YAML alias is expanded (counted, not expanded:
    an aliased object is counted once per use from a memo by id), stopping past `limit`."""
    memo: dict = {}

    def size(obj) -> int:
        if not isinstance(obj, (dict, list)):
            return 1
        if id(obj) in memo:
            return memo[id(obj)]
        memo[id(obj)] = limit + 1  # a self-referencing alias (&a [*a]) is infinite
        items = obj.items() if isinstance(obj, dict) else ((None, v) for v in obj)
        total = 1
        for key, value in items:
            total += size(key) + size(value) if key is not None else size(value)
            if total > limit:
                break
        memo[id(obj)] = total
        return total

    return size(data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one
    silently: a second `augment:` line dropped every key of the first). Merge keys (<<) may repeat."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"the key '{key}' is written twice in one section (the first would be ignored): keep one",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


REPOSITORY = Path(__file__).resolve().parents[1]


def shipped_dir(name: str, repository: Path = REPOSITORY, prefix: Optional[str] = None) -> Path:
    """Where a folder that ships with distcls (configs, slurm, launch) is: the repository's (a clone or
    an editable install), else where pip installed it (<sys.prefix>/share/distcls/, pyproject's data-files)."""
    # (not another package's folder in site-packages)
    checkout = (repository / "pyproject.toml").is_file() and (repository / name).is_dir()
    return repository / name if checkout else Path(prefix or sys.prefix) / "share" / "distcls" / name


CONFIG_DIR = shipped_dir("configs")


def resolve_config_path(path: str) -> str:
    """A --config value: a file, or the name of a shipped config (`imagenet_resnet50_tv_v2`, with or without .yaml)."""
    p = Path(path)
    if p.is_file() or "/" in path or os.sep in path:
        return path  # a file, or a path written as one: taken literally
    if Path(f"{path}.yaml").is_file():
        return f"{path}.yaml"  # ./NAME.yaml before a shipped config of that name
    for candidate in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return path


def shipped_configs() -> list[str]:
    """The shipped configs' names (the old names, links in the repository and copies once installed, left out)."""
    return (
        sorted(f.stem for f in CONFIG_DIR.glob("*.yaml") if not f.is_symlink() and f.name not in RENAMED_CONFIGS)
        if CONFIG_DIR.is_dir()
        else []
    )


def read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        names = shipped_configs()
        close = difflib.get_close_matches(p.stem, names, n=1)
        raise ConfigError(
            f"config file {path} not found{' (it is a directory)' if p.is_dir() else ''}; pass an existing YAML file "
            "to --config, "
            + (
                f"or a shipped config's name (did you mean {close[0]}?)"
                if close
                else f"or a shipped config's name: {', '.join(names)}"
                if names
                else "e.g. configs/default.yaml"
            )
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not a text file (byte {exc.start} is not UTF-8); pass a YAML file to --config"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}; fix the syntax") from None
    except RecursionError:
        data = RecursionError
    if data is None:
        return {}
    try:
        expanded = 0 if data is RecursionError else _expanded_size(data, MAX_CONFIG_VALUES)
    except RecursionError:
        data = RecursionError
    if data is RecursionError:
        raise ConfigError(f"config file {path} nests its values too deeply (hundreds of [ or {{ levels); "
                          "a distcls config nests a few levels: fix the file")
    if expanded > MAX_CONFIG_VALUES:
        raise ConfigError(f"config file {path} expands to more than {MAX_CONFIG_VALUES:,} values through YAML aliases "
                          "(*name repeating &name); a distcls config has a few hundred: remove the nested aliases")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections (data:, model:, ...), not a {type(data).__name__}"
        )
    return data


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override '{item}' is not of the form key.sub=value (e.g. optim.lr=0.05)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    except RecursionError:
        raise ConfigError(
            f"override {key.strip()}=... nests its value too deeply (hundreds of [ or {{ levels); give a plain value"
        ) from None
    return key.strip(), value


def from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree, prefix="")
    _check_cross_fields(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe() -> list[tuple[str, Any, str]]:
    """Every key of the schema: (dot path, default, help) for --help and docs/configuration.md."""
    rows = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(_field_type(cls, f)):
                walk(_field_type(cls, f), f"{prefix}{f.name}.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append((prefix + f.name, default, f.metadata.get("help", "")))

    walk(Config, "")
    return rows


def resume_keys(kind: str) -> list[str]:
    """The dot paths whose schema field is marked `resume=kind` (every key of SCHEDULE_SECTIONS for "schedule")."""
    if kind == "schedule":
        return [path for path, _, _ in describe() if path.split(".")[0] in SCHEDULE_SECTIONS]
    return [path for path, _, _ in describe() if field_rules(path).get("resume") == kind]


def reference_markdown() -> str:
    """docs/configuration.md's table, from the schema: every key, its default, what it allows, what it means
    (tests/test_docs.py checks the page holds exactly this)."""
    def show(value) -> str:
        return (
            "null"
            if value is None
            else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        )

    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for path, default, help in describe():
        rules = field_rules(path)
        allowed = (
            " \\| ".join(show(c) for c in rules["choices"])
            if "choices" in rules
            else " ".join(
                part
                for part in (
                    (f"{'>' if rules.get('exclusive_min') else '>='} {rules['min']}" if "min" in rules else ""),
                    (f"<= {rules['max']}" if "max" in rules else ""),
                )
                if part
            )
        )
        meaning = help.replace("|", "\\|")
        rows.append(f"| `{path}` | `{show(default)}` | {allowed} | {meaning} |")
    return "\n".join(rows) + "\n"


def field_rules(path: str) -> dict:
    """The schema field's metadata at a dot path: help, choices, min, max, resume."""
    cls = Config
    *sections, name = path.split(".")
    for section in sections:
        cls = _field_type(cls, _fields(cls)[section])
    return dict(_fields(cls)[name].metadata)


# --------------------------------------------------------------------------- internals


def _field_type(cls, f):
    return typing.get_type_hints(cls)[f.name]


def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(key: str, prefix: str, cls) -> ConfigError:
    names = list(_fields(cls))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(prefix + n for n in names)}"
    return ConfigError(f"unknown config key '{prefix}{key}'; {hint}")


def _deep_merge(tree: dict, update: dict, cls, prefix: str) -> None:
    fields = _fields(cls)
    for key, value in update.items():
        if key not in fields:
            raise _unknown(str(key), prefix, cls)
        sub = _field_type(cls, fields[key])
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{key}' is a section; give it a mapping of keys, not {value!r}")
            _deep_merge(tree[key], value, sub, f"{prefix}{key}.")
        else:
            tree[key] = value


def _set_path(tree: dict, parts: list, value, cls, prefix: str = "") -> None:
    fields = _fields(cls)
    key = parts[0]
    if key not in fields:
        raise _unknown(key, prefix, cls)
    sub = _field_type(cls, fields[key])
    if len(parts) == 1:
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key '{prefix}{key}' is a section; override one of its keys, e.g. "
                    f"{prefix}{key}.{next(iter(_fields(sub)))}=..."
                )
            _deep_merge(tree[key], value, sub, f"{prefix}{key}.")
        else:
            tree[key] = value
    elif dataclasses.is_dataclass(sub):
        _set_path(tree[key], parts[1:], value, sub, f"{prefix}{key}.")
    elif sub is dict:
        inner = dict(tree.get(key) or {})
        node = inner
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        tree[key] = inner
    else:
        raise ConfigError(f"config key '{prefix}{key}' is a value, not a section; use {prefix}{key}=...")


def _type_name(t) -> str:
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(t, str(t))


def _coerce(value, typ, path: str):
    """Check `value` against a schema type; ints are accepted for floats."""
    optional = typing.get_origin(typ) is typing.Union and type(None) in typing.get_args(typ)
    if optional:
        if value is None:
            return None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, float):
        _finite(value, path)
        return value
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        got = "null" if value is None else f"{value!r} ({type(value).__name__})"
        raise ConfigError(f"config key '{path}' must be {_type_name(typ)}{' or null' if optional else ''}, got {got}")
    return value


def _build(cls, tree, prefix: str):
    if not isinstance(tree, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping")
    kwargs = {}
    for name, f in _fields(cls).items():
        path = prefix + name
        typ = _field_type(cls, f)
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, tree.get(name, {}), path + ".")
            continue
        value = (
            _coerce(tree[name], typ, path)
            if name in tree
            else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        )
        _check_rules(value, f.metadata, path)
        kwargs[name] = value
    for key in tree:
        if key not in kwargs:
            raise _unknown(str(key), prefix, cls)
    return cls(**kwargs)


def _check_rules(value, rules, path: str) -> None:
    if "choices" in rules and value not in rules["choices"]:
        choices = " | ".join("null" if c is None else str(c) for c in rules["choices"])
        raise ConfigError(f"config key '{path}' must be one of {choices}, got {value!r}")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if "min" in rules and (value < rules["min"] or (rules.get("exclusive_min") and value == rules["min"])):
        op = ">" if rules.get("exclusive_min") else ">="
        raise ConfigError(f"config key '{path}' must be {op} {rules['min']}, got {value}")
    if "max" in rules and value > rules["max"]:
        raise ConfigError(f"config key '{path}' must be <= {rules['max']}, got {value}")


def _finite(value: float, path: str) -> None:
    """NaN and +-inf pass every min/max comparison, so every float is checked for them first."""
    if not math.isfinite(value):
        raise ConfigError(f"config key '{path}' must be a finite number, got {value}")


# A number YAML 1.1 leaves a string (an exponent without a dot: 2e-2, 1E5): what the lists accept as numbers.
_YAML_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number_list(value, path: str, length: Optional[int] = None) -> None:
    """Check a list of numbers; entries YAML 1.1 read as strings (`2e-2`, no dot) become floats, in place, as scalars
    do."""
    if value is None:
        return
    for i, v in enumerate(value):
        if isinstance(v, str) and _YAML_FLOAT.fullmatch(v):
            value[i] = float(v)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or (
        length and len(value) != length
    ):
        want = f"{length} numbers" if length else "a list of numbers"
        raise ConfigError(f"config key '{path}' must be {want}, got {value!r}")
    for v in value:
        _finite(v, path)


def _check_cross_fields(cfg: Config) -> None:
    d = cfg.data
    _number_list(d.split, "data.split", 3)
    if d.split is not None:
        if any(v < 0 for v in d.split) or abs(sum(d.split) - 1.0) > 1e-6 or d.split[0] <= 0 or d.split[2] <= 0:
            raise ConfigError(
                "config key 'data.split' must be three fractions [train, val, test] summing to 1 with train and test "
                f"> 0, got {d.split}"
            )
    _number_list(d.mean, "data.mean")
    _number_list(d.std, "data.std")
    if (d.mean is None) != (d.std is None):
        raise ConfigError("set both data.mean and data.std (one value per channel), or neither")
    if d.std is not None and any(s <= 0 for s in d.std):
        raise ConfigError(f"config key 'data.std' must hold positive numbers, got {d.std}")
    if d.mean is not None and len(d.mean) != len(d.std):
        raise ConfigError(
            f"data.mean has {len(d.mean)} values but data.std has {len(d.std)}; give one per channel in both"
        )
    _number_list(cfg.optim.betas, "optim.betas", 2)
    if not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {cfg.optim.betas}")
    check_batch_split(cfg.data.batch_size, 1, cfg.train.accum_steps)  # again with the world size at launch
    if not all(isinstance(t, str) and t for t in cfg.log.wandb.tags):
        raise ConfigError(
            "config key 'log.wandb.tags' must be a list of non-empty strings, e.g. [baseline, cifar10], got "
            f"{cfg.log.wandb.tags!r}"
        )
    if cfg.checkpoint.best_metric == "val_ema_acc" and not cfg.train.ema.enabled:
        raise ConfigError(
            "checkpoint.best_metric=val_ema_acc follows the EMA's validation accuracy: set train.ema.enabled=true, "
            "or checkpoint.best_metric=val_acc"
        )
    if not cfg.run.out_dir:
        raise ConfigError("run.out_dir must name a directory")
    if cfg.model.freeze_backbone is False and cfg.model.freeze == "backbone":
        raise ConfigError(
            "model.freeze_backbone=false contradicts model.freeze=backbone; model.freeze_backbone is the old "
            "spelling of model.freeze: remove it and set model.freeze=none|backbone"
        )
    m = cfg.model
    if (m.dropout is not None or m.drop_path is not None) and ":" not in m.name:
        key = "model.dropout" if m.dropout is not None else "model.drop_path"
        raise ConfigError(
            f"{key} applies to model.name=torchvision:<name> and timm:<name> (and plug-ins 'pkg.module:builder', which "
            f"read it), not to model.name={m.name}; set {key}=null or use model.args"
        )
    if cfg.model.frozen and not cfg.model.pretrained:
        raise ConfigError(
            "model.freeze=backbone needs model.pretrained=<weights file or torchvision:WEIGHTS>; a frozen random "
            "backbone learns nothing"
        )
    eval_crop = d.eval_crop_size or d.image_size
    if d.eval_resize is not None and eval_crop is not None and d.eval_resize < eval_crop:
        which = "data.eval_crop_size" if d.eval_crop_size else "data.image_size"
        raise ConfigError(
            f"data.eval_resize={d.eval_resize} is smaller than {which}={eval_crop}: the center crop would not fit; "
            f"use at least {eval_crop} (or null for {which}/0.875)"
        )
    for key in ("scale", "ratio", "erase_scale", "erase_ratio"):
        value = getattr(d.augment, key)
        _number_list(value, f"data.augment.{key}", 2)
        if not (0 < value[0] <= value[1]) or (key.endswith("scale") and value[1] > 1):
            raise ConfigError(
                f"config key 'data.augment.{key}' must be [min, max] with 0 < min <= "
                f"max{' <= 1' if key.endswith('scale') else ''}, got {value}"
            )
    if d.augment.magnitude >= d.augment.num_magnitude_bins:
        raise ConfigError(
            f"data.augment.magnitude={d.augment.magnitude} must be below "
            f"data.augment.num_magnitude_bins={d.augment.num_magnitude_bins} "
            "(bins are numbered from 0); lower the magnitude or raise the number of bins"
        )


def check_transfer(cfg: Config) -> None:
    """Training only, like check_schedule: checkpoints of runs that predate it still evaluate."""
    if cfg.optim.backbone_lr_scale != 1.0 and not cfg.model.pretrained:
        raise ConfigError(
            f"optim.backbone_lr_scale={cfg.optim.backbone_lr_scale} needs model.pretrained=<weights file or "
            "torchvision:WEIGHTS>: it slows the backbone's learning to keep pretrained features; a random "
            "backbone has none. Remove it, or set model.pretrained"
        )
    if cfg.optim.backbone_lr_scale != 1.0 and cfg.model.frozen:
        raise ConfigError(
            f"optim.backbone_lr_scale={cfg.optim.backbone_lr_scale} has no effect with model.freeze=backbone "
            "(the backbone does not learn); remove it, or set model.freeze=none to fine-tune"
        )


def check_schedule(cfg: Config) -> None:
    """Training only (train.check_launch), not every config load: a checkpoint's stored config that
    predates this check must still load for evaluate, predict and plot."""
    if cfg.sched.name == "cosine" and cfg.sched.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"sched.min_lr={cfg.sched.min_lr} is above optim.lr={cfg.optim.lr}: the cosine schedule would rise "
            "instead of decay; set sched.min_lr <= optim.lr (it is the lr the cosine ends at)"
        )
    if cfg.sched.name == "onecycle" and (cfg.sched.warmup_epochs or cfg.sched.interval == "epoch"):
        raise ConfigError(
            "sched.name=onecycle has its own warmup (sched.pct_start) and changes the lr every step; set "
            "sched.warmup_epochs=0 and sched.interval=step"
        )
    if cfg.sched.name == "multistep" and any(not isinstance(m, int) or m < 1 for m in cfg.sched.milestones):
        raise ConfigError(f"sched.milestones={cfg.sched.milestones}: give whole epochs >= 1, e.g. [30, 60, 90]")
    if cfg.sched.interval == "epoch" and cfg.sched.warmup_epochs != int(cfg.sched.warmup_epochs):
        raise ConfigError(
            f"sched.warmup_epochs={cfg.sched.warmup_epochs} is not a whole number of epochs, which "
            "sched.interval=epoch counts in; round it, or set sched.interval=step"
        )


def check_batch_split(global_batch: int, world_size: int, accum_steps: int = 1) -> None:
    """The one check that the global batch splits into equal micro-batches on every rank."""
    parts = world_size * accum_steps
    if global_batch % parts:
        raise ConfigError(
            f"data.batch_size={global_batch} is the GLOBAL batch: it must split evenly over {world_size} processes x "
            f"{accum_steps} accumulation steps; use a multiple of {parts}, e.g. "
            f"data.batch_size={global_batch - global_batch % parts or parts}"
        )
