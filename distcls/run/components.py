"""The run's components, built from the config and this process's DistEnv.

    parts = build_components(cfg, env)      # data, loaders, model, optimizer, ..., checkpointer

Building only builds: nothing is restored from a checkpoint, written, logged or printed (the
runner does those as separate steps after it). `runner.TrainingRun`, `bench compare` and the
tests all build through here, so what they measure and test is what a run trains with.
"""
from __future__ import annotations

import inspect
import random
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from distcls.checkpoint import CheckpointFiles, Checkpointer, GlobalRNG
from distcls.checkpoint.checkpointer import ModuleWeights, OptimizerState, SavePolicy
from distcls.config import Config
from distcls.data import Data, build_data, eval_loader, train_loader
from distcls.data.loader import BatchLoader
from distcls.runtime import provenance as runtime_provenance
from distcls.runtime.dist import DistEnv
from distcls.tracking.metrics import TARGET_PREFIX
from distcls.errors import ConfigError
from distcls.engine import (
    EMAHook, EMASchedule, ModelEMA, Precision, Progress, Trainer, adjusted_decay, backends, build_optimizer,
    build_scheduler,
)
from distcls.models import build_model, check_forward
from distcls.models.weights import normalization_source, with_pretrained_preprocessing

DEBUG_STEPS_PER_EPOCH = 5


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_model(cfg: Config, env: DistEnv, spec, log: Callable[[str], None] = lambda msg: None,
                  train_size: Optional[int] = None) -> tuple[nn.Module, nn.Module]:
    """(model to train: compiled and/or DDP-wrapped, plain module that owns the weights).

    Collective under torchrun: constructing DistributedDataParallel broadcasts rank 0's weights."""
    module = build_model(cfg.model, spec, log)
    check_forward(module, spec, cfg.model.name, train_size)
    if cfg.train.sync_bn and env.distributed:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    module = module.to(env.device)
    if cfg.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    model = torch.compile(module) if cfg.train.compile else module
    if env.distributed:
        # BatchNorm buffers are not synced in forward; the run averages them at every epoch end instead.
        ddp = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in ddp else {"broadcast_buffers": False}
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **buffers,
        )
    return model, module


@dataclass(frozen=True)
class LoaderSettings:
    """How this process's loaders read batches: the `data.*` loader keys, with --debug's changes."""
    num_workers: int = 0
    prefetch_factor: int = 4
    gpu_decode: bool = False
    max_steps_per_epoch: Optional[int] = None  # training only: stop each epoch after this many optimizer steps

    @classmethod
    def from_config(cls, cfg: Config, debug: bool = False) -> "LoaderSettings":
        return cls(num_workers=0 if debug else cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                   gpu_decode=cfg.data.gpu_decode,
                   max_steps_per_epoch=cfg.train.max_steps_per_epoch or (DEBUG_STEPS_PER_EPOCH if debug else None))


@dataclass(frozen=True)
class EvalTarget:
    """One module each evaluation evaluates (val every epoch, test at the end). Its numbers go into
    the records and summary.json under `prefix` ("": the trained weights, test_acc; "ema_": the model
    EMA, ema_test_acc), and checkpoint.best_metric=val_<prefix>acc makes best.pt follow it. A new
    optional copy of the weights (another EMA, SWA) is one more target here: the runner loops, and
    tracking shows every target it finds in the records (docs/design.md, "Adding an optional component")."""
    prefix: str
    module: nn.Module
    # False while it holds nothing to evaluate (an EMA before its first update)
    ready: Callable[[], bool] = lambda: True
    fields: Callable[[], dict] = dict  # what every record of it carries besides loss and acc (the EMA's update count)

    def __post_init__(self):
        # the console, the plots and the final table find a target's numbers by this form (tracking/metrics.py)
        if self.prefix and not re.fullmatch(TARGET_PREFIX, self.prefix):
            raise ValueError(f"a target's prefix is one lowercase word and '_' (e.g. 'ema_'), not {self.prefix!r}")


@dataclass
class Components:
    """A run's components. `model` runs the forward (compiled and/or the DDP wrapper); `module`
    is the plain nn.Module that owns the weights (evaluated, saved, loaded)."""
    data: Data
    train: BatchLoader
    val: Optional[BatchLoader]
    test: BatchLoader
    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    trainer: Trainer
    progress: Progress
    checkpointer: Checkpointer
    switches: dict = field(default_factory=dict)  # the device's math switches as set (engine/backends.py)
    ema: Optional[ModelEMA] = None  # model EMA (train.ema.enabled), on every rank
    targets: list = field(default_factory=list)  # EvalTarget: what each evaluation evaluates (the weights first)
    provenance: dict = field(default_factory=dict)  # where the run's outputs came from (runtime/provenance.py)

    @property
    def lr(self) -> float:
        """The first group's lr of the LAST optimizer step (what a record of it reports; the optimizer
        already holds the next step's: with sched.interval=epoch, at an epoch's end, the next epoch's)."""
        steps = self.scheduler.last_epoch  # the LambdaLR's count of steps taken
        if steps <= 0 or not hasattr(self.scheduler, "lr_lambdas"):
            return self.optimizer.param_groups[0]["lr"]
        return self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](steps - 1)

    @property
    def loaders(self) -> list[BatchLoader]:
        return [self.train, self.test] + ([self.val] if self.val is not None else [])


def build_loaders(cfg: Config, env: DistEnv, data: Data, settings: LoaderSettings) -> tuple:
    """(train, val or None, test): this rank's loaders of the splits."""
    s = settings
    train = train_loader(
        data.splits.train, cfg.data.batch_size, env.world_size, env.rank, cfg.run.seed, env.device, s.num_workers,
        s.max_steps_per_epoch, s.prefetch_factor, s.gpu_decode, repeats=cfg.data.repeats,
    )
    eval_batch = cfg.data.eval_batch_size or cfg.data.batch_size

    def evaluation(view):
        return eval_loader(
            view, eval_batch, env.world_size, env.rank, env.device, s.num_workers, s.prefetch_factor, s.gpu_decode
        )

    return train, evaluation(data.splits.val) if data.splits.val else None, evaluation(data.splits.test)


def build_ema(cfg: Config, module: nn.Module, steps_per_epoch: int) -> tuple[Optional[ModelEMA], Optional[EMASchedule]]:
    """(the model EMA, when it updates), or (None, None) without train.ema.enabled. Built from the plain
    module that trains: after SyncBatchNorm conversion and the move to the device (same layer types,
    same device), before compile/DDP (which keep its parameter tensors)."""
    e = cfg.train.ema
    if not e.enabled:
        return None, None
    total_steps = steps_per_epoch * cfg.train.epochs
    # An EMA that never updates would stay the initial (random) weights, evaluated and reported as the EMA
    # (cadence epoch: every epoch's first step updates)
    if total_steps < e.every_steps and e.cadence == "run":
        raise ConfigError(
            f"train.ema.every_steps={e.every_steps}, but this run makes only {total_steps} optimizer steps "
            f"({cfg.train.epochs} epochs of {steps_per_epoch}, as train.max_steps_per_epoch or --debug leave them): "
            f"its model EMA would never update; set train.ema.every_steps <= {total_steps} (for a short smoke run: 1), "
            "train for more steps, or set train.ema.enabled=false"
        )
    decay = adjusted_decay(e.decay, cfg.data.batch_size, e.every_steps, cfg.train.epochs) if e.adjust_decay else e.decay
    warmup = int(round(cfg.sched.warmup_epochs * steps_per_epoch)) if e.warmup_copy else 0
    return ModelEMA(module, decay), EMASchedule(e.every_steps, warmup, e.cadence, steps_per_epoch)


def build_components(cfg: Config, env: DistEnv, debug: bool = False, files: Optional[CheckpointFiles] = None,
                     log: Callable[[str], None] = lambda msg: None) -> Components:
    """Collective under torchrun (a dataset download's barrier and broadcast, DDP's broadcast of
    the initial weights): every rank builds, in the same order. `files`: where the checkpointer
    writes (default: run.out_dir's checkpoints/); `log`: model building's messages."""
    seed_everything(cfg.run.seed)
    switches = backends.configure(cfg.train.cudnn_benchmark, cfg.train.tf32, cfg.run.deterministic or debug, env.device)
    prepared = with_pretrained_preprocessing(cfg)  # torchvision weights bring their mean/std and sizes
    data = build_data(
        prepared,
        normalization_source(cfg, prepared),
        run_dir=files.dir.parent if files is not None else Path(cfg.run.out_dir),
    )
    model, module = prepare_model(cfg, env, data.spec, log, train_size=data.preprocess.train_image_size)
    optimizer = build_optimizer(module, cfg.optim)
    train, val, test = build_loaders(cfg, env, data, LoaderSettings.from_config(cfg, debug))
    steps_per_epoch = train.sampler.steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.optim, steps_per_epoch, cfg.train.epochs)
    precision = Precision(cfg.train.amp, env.device)
    ema, ema_schedule = build_ema(cfg, module, steps_per_epoch)
    trainer = Trainer(
        model=model,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        precision=precision,
        cfg=cfg.train,
        preprocess=data.preprocess,
        device=env.device,
        hooks=[EMAHook(ema, ema_schedule)] if ema is not None else [],
    )
    progress = Progress(env.device, env.is_main, steps_per_epoch)
    # versions, git commit, command, hosts: in summary.json and every checkpoint
    provenance = runtime_provenance.collect(env.world_size)
    checkpointer = Checkpointer(
        files or CheckpointFiles(cfg.run.out_dir, cfg.checkpoint.keep),
        {
            "model": ModuleWeights(module),
            "optimizer": OptimizerState(optimizer),
            "scheduler": scheduler,
            "scaler": precision,
            "rng": GlobalRNG(),
            **({"ema": ema} if ema is not None else {}),
        },
        progress,
        SavePolicy(cfg.checkpoint.every_steps, cfg.checkpoint.every_epochs, cfg.train.epochs, val is not None),
        {
            "config": cfg.to_dict(),
            "data_spec": data.spec.to_dict(),
            "world_size": env.world_size,
            "provenance": provenance,
            "train_samples": len(data.splits.train),
        },
        env.is_main,
        # A save first waits for the steps whose flags the host has not read: an aborting run
        # (train.nonfinite=abort) raises there instead of saving the state after its diverged step.
        before_save=trainer.check_diverged,
    )
    targets = [EvalTarget("", module)]  # what each evaluation evaluates: the weights, then every optional copy of them
    if ema is not None:
        targets.append(
            EvalTarget("ema_", ema.module, ready=lambda: ema.updates > 0, fields=lambda: {"ema_updates": ema.updates})
        )
    return Components(
        data=data, train=train, val=val, test=test, model=model, module=module, optimizer=optimizer,
        scheduler=scheduler, precision=precision, trainer=trainer, progress=progress, checkpointer=checkpointer,
        switches=switches, ema=ema, targets=targets, provenance=provenance,
    )
