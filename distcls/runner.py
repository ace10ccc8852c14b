"""One training run, start to finish: wires config -> dist -> data -> models -> engine ->
checkpoint/tracking, and owns the epoch loop, its logging, checkpoint policy and resume.
"""
from __future__ import annotations

import inspect
import json
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from distcls import config as config_mod
from distcls import dist
from distcls.checkpoint import (CheckpointStore, Found, check_compatible, load_model_state, load_state, read_checkpoint, resume_reason,
                                rng_state, set_rng_state)
from distcls.config import Config
from distcls.data import build_data, eval_loader, train_loader
from distcls.dist import DistEnv
from distcls.engine import Meter, StepContext, Trainer, build_optimizer, build_scheduler
from distcls.errors import Preempted, UserError
from distcls.atomic_files import atomic_write_text
from distcls.models import build_model, check_forward, count_parameters
from distcls.rundir import RunDirLock, check_outputs
from distcls.signals import StopRequest
from distcls.tracking import Console, MetricsLog, WandbLogger, summary_rows, write_summary
from distcls.tracking.plots import SampleSource, write_run_plots

DEBUG_STEPS_PER_EPOCH = 5


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_model(cfg: Config, env: DistEnv, spec, log=lambda msg: None) -> tuple[nn.Module, nn.Module]:
    """(model to train: compiled and/or DDP-wrapped, raw module that owns the weights)."""
    raw = build_model(cfg.model, spec, log)
    check_forward(raw, spec, cfg.model.name)
    if cfg.train.sync_bn and env.distributed:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    raw = raw.to(env.device)
    if cfg.train.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    model = torch.compile(raw) if cfg.train.compile else raw
    if env.distributed:
        # BatchNorm buffers are not synced in forward; they are averaged before every evaluation instead.
        buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters else {"broadcast_buffers": False}
        model = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None, **buffers)
    return model, raw


class TrainingRun:
    def __init__(self, cfg: Config, env: DistEnv, resume: Optional[str] = None, debug: bool = False):
        self.cfg, self.env, self.debug = cfg, env, debug
        self.out_dir = Path(cfg.run.out_dir)
        self.console = Console(env.rank, cfg.log.console)
        self.store = CheckpointStore(self.out_dir, cfg.checkpoint.keep, env.is_main, warn=self._warn_main)
        self.metrics = MetricsLog(self.out_dir, env.is_main)
        self.lock = RunDirLock(self.out_dir)
        if env.is_main:  # rank 0 writes: it checks the outputs and holds the out_dir for the run's lifetime
            check_outputs(self.out_dir)
            self.lock.acquire()
            if not self.lock.supported:
                self.console.warn(f"{self.out_dir}: this filesystem does not support file locks; make sure no other run writes there")
            for stale in self.lock.remove_stale_temps():
                self.console.warn(f"removed {stale}: the temp file of a save that was killed")
        try:
            self.resume_point = self._find_resume(resume)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release run.out_dir (also called at the end of `run`)."""
        self.lock.release()

    # ----------------------------------------------------------------- setup

    def _warn_main(self, msg: str) -> None:
        if self.env.is_main:
            self.console.warn(msg)

    def _existing_outputs(self) -> Optional[str]:
        if self.store.has_checkpoints():
            return "checkpoints"
        for name in ("summary.json", "metrics.jsonl"):
            p = self.out_dir / name
            if p.is_file() and p.stat().st_size:
                return name
        return None

    def _find_resume(self, flag: Optional[str]) -> Optional[Found]:
        reason = resume_reason(flag)
        if reason is None:
            existing = self._existing_outputs()
            if existing:
                raise UserError(
                    f"run.out_dir={self.out_dir} already holds {existing} of a run; pass --resume auto to continue it, "
                    "or choose another run.out_dir (nothing was overwritten)")
            return None
        if flag and flag != "auto":
            ckpt = read_checkpoint(flag, "--resume")
            return Found(Path(flag), ckpt)
        found = self.store.find_latest()  # an error if checkpoints exist but none is usable: never overwrite them
        if found is None:
            self.console.info(f"{reason}: no checkpoint in {self.store.dir}, starting fresh")
        return found

    def _finished_summary(self) -> Optional[dict]:
        """The summary of this out_dir's run when the resume point is its final checkpoint and it was written."""
        ck = self.resume_point.checkpoint if self.resume_point is not None else None
        if ck is None or ck["epoch"] < self.cfg.train.epochs or ck.get("epoch_step", 0):
            return None
        try:
            summary = json.loads((self.out_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return None  # stopped between the final checkpoint and the summary: evaluate the test split again
        if not isinstance(summary, dict) or summary.get("global_step") != ck["step"]:
            return None
        return summary

    # ----------------------------------------------------------------- main

    def run(self) -> dict:
        try:
            finished = self._finished_summary()
            if finished is not None:
                self.console.info(f"the run in {self.out_dir} already finished ({self.cfg.train.epochs} epochs, "
                                  f"test acc {finished.get('test_acc')}); nothing to do. Raise train.epochs to train longer")
                return finished
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        cfg, env = self.cfg, self.env
        wall = time.perf_counter()
        seed_everything(cfg.run.seed)
        if cfg.run.deterministic or self.debug:
            torch.use_deterministic_algorithms(True, warn_only=env.device.type == "cuda")
        data = build_data(cfg)
        spec = data.spec
        model, raw = prepare_model(cfg, env, spec, self.console.info)
        optimizer = build_optimizer(raw, cfg.optim)
        max_steps = cfg.train.max_steps_per_epoch or (DEBUG_STEPS_PER_EPOCH if self.debug else None)
        num_workers = 0 if self.debug else cfg.data.num_workers
        train = train_loader(data.splits.train, cfg.data.batch_size, env.world_size, env.rank, cfg.run.seed, env.device,
                             num_workers, max_steps, cfg.data.prefetch_factor, cfg.data.gpu_decode)
        eval_batch = cfg.data.eval_batch_size or cfg.data.batch_size
        loading = (num_workers, cfg.data.prefetch_factor, cfg.data.gpu_decode)
        val = eval_loader(data.splits.val, eval_batch, env.world_size, env.rank, env.device, *loading) if data.splits.val else None
        test = eval_loader(data.splits.test, eval_batch, env.world_size, env.rank, env.device, *loading)
        for bad in data.skipped_files[:5]:
            self._warn_main(f"skipped bad image {bad}")
        if len(data.skipped_files) > 5:
            self._warn_main(f"... and {len(data.skipped_files) - 5} more bad images skipped (data.skip_bad_images=true)")
        steps_per_epoch = train.sampler.steps_per_epoch
        scheduler = build_scheduler(optimizer, cfg.sched, cfg.optim, steps_per_epoch, cfg.train.epochs)
        scaler = torch.amp.GradScaler(env.device.type) if cfg.train.amp == "fp16" else None
        trainer = Trainer(model, raw, optimizer, scheduler, scaler, cfg.train, data.preprocess, env.device)

        start_epoch, start_step, best, partial, interval_start, resumed_from = 0, 0, -1.0, None, None, None
        wandb_id = None
        if self.resume_point is not None:
            ck, path = self.resume_point.checkpoint, self.resume_point.path
            check_compatible(ck, path, cfg, spec.to_dict())
            load_model_state(raw, ck["model"], path)
            load_state(optimizer, ck["optimizer"], path, "optimizer")
            load_state(scheduler, ck["scheduler"], path, "scheduler")
            if scaler is not None and ck.get("scaler"):
                load_state(scaler, ck["scaler"], path, "scaler")
            set_rng_state(ck["rng"])
            trainer.global_step, trainer.skipped_steps = ck["step"], ck.get("skipped_steps", 0)
            start_epoch, start_step, best = ck["epoch"], ck.get("epoch_step", 0), ck["best_metric"]
            # rank 0 carries the ranks' reduced sums so far (epoch, and the current log interval); the others start at 0
            partial = Meter(**ck["meter"]) if ck.get("meter") and env.is_main and start_step else None
            interval_start = Meter(**ck["interval_meter"]) if ck.get("interval_meter") and partial is not None else None
            wandb_id = ck.get("wandb_id")
            resumed_from = {"path": str(path), "epoch": start_epoch, "epoch_step": start_step, "step": ck["step"],
                            "world_size": ck.get("world_size", env.world_size)}
            if start_step >= steps_per_epoch:
                start_epoch, start_step, partial, interval_start = start_epoch + 1, 0, None, None

        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.yaml", config_mod.to_yaml(cfg))
            self.metrics.truncate_after(trainer.global_step if resumed_from else -1)
        wandb = WandbLogger(cfg.log.wandb, str(self.out_dir), cfg.to_dict(), env.is_main, wandb_id, warn=self.console.warn)
        total, trainable = count_parameters(raw)
        self.console.info(
            f"distcls: {cfg.model.name} ({total:,} parameters, {trainable:,} trainable) on {cfg.data.name} "
            f"{spec.channels}x{spec.image_size}x{spec.image_size}, {spec.num_classes} classes | train {len(data.splits.train)} / "
            f"val {len(data.splits.val) if data.splits.val else 0} / test {len(data.splits.test)} | world {env.world_size} "
            f"({env.launcher}, {env.device.type}, {env.backend if env.distributed else 'no process group'}) | "
            f"global batch {cfg.data.batch_size}, {steps_per_epoch} steps/epoch")
        if resumed_from:
            self.console.info(f"resumed from {resumed_from['path']} at epoch {start_epoch + 1}, step {start_step} of the epoch")
            if resumed_from["world_size"] != env.world_size:
                self.console.info(f"the checkpoint was saved at world size {resumed_from['world_size']}; resuming at world size "
                                  f"{env.world_size} (same global batch {cfg.data.batch_size}, same sample order)")

        stop = StopRequest().install()
        last_val = None
        train_images, train_seconds = 0.0, 0.0
        try:
            for epoch in range(start_epoch, cfg.train.epochs):
                first_step = start_step if epoch == start_epoch else 0
                resumed_here = epoch == start_epoch and partial is not None
                meter = partial if resumed_here else Meter()
                logged = {"meter": Meter(**(interval_start or meter).state_dict()) if resumed_here else Meter(), "time": time.perf_counter()}
                epoch_start, steps_done = time.perf_counter(), 0
                self.console.start_epoch(epoch, cfg.train.epochs, steps_per_epoch, first_step, cfg.data.batch_size)

                def on_step_end(ctx: StepContext) -> bool:
                    nonlocal steps_done
                    steps_done += 1
                    # host floats the step already read (no extra device sync)
                    self.console.advance(ctx.meter.loss_sum, ctx.meter.correct, ctx.meter.count, optimizer.param_groups[0]["lr"])
                    if cfg.log.every_steps and ctx.global_step % cfg.log.every_steps == 0:
                        self._log_interval(ctx, logged, optimizer, wandb)
                    if ctx.stop_requested and ctx.epoch_step < steps_per_epoch:
                        # (at the epoch's last step the epoch-end check below stops after evaluation)
                        state = self._state(trainer, cfg, spec, epoch, ctx.epoch_step, ctx.meter, best, wandb.run_id, logged["meter"])
                        path = self.store.save(state, epoch_file=False, is_best=False)
                        raise Preempted(stop.signal_name or "a stop signal on another rank", path or self.store.last)
                    if cfg.checkpoint.every_steps and ctx.global_step % cfg.checkpoint.every_steps == 0 and ctx.epoch_step < steps_per_epoch:
                        self.store.save(self._state(trainer, cfg, spec, epoch, ctx.epoch_step, ctx.meter, best, wandb.run_id,
                                                    logged["meter"]), epoch_file=False, is_best=False)
                    return False

                meter = trainer.train_epoch(train, epoch, first_step, meter, on_step_end, stop_flag=lambda: stop.requested)
                self.console.end_epoch()
                seconds = time.perf_counter() - epoch_start
                images = steps_done * cfg.data.batch_size
                train_images, train_seconds = train_images + images, train_seconds + seconds
                red = meter.reduced(env.device)
                train_record = self._record({"epoch": epoch + 1, "step": trainer.global_step, "split": "train", "loss": red.loss, "acc": red.acc,
                                             "lr": optimizer.param_groups[0]["lr"], "images_per_sec": images / max(seconds, 1e-9),
                                             "skipped_steps": trainer.skipped_steps}, wandb)
                is_best, val_record = False, None
                if val is not None:
                    last_val = trainer.evaluate(val, spec.num_classes)
                    is_best = last_val.acc > best
                    best = max(best, last_val.acc)
                    val_record = self._record({"epoch": epoch + 1, "step": trainer.global_step, "split": "val", "loss": last_val.loss,
                                               "acc": last_val.acc, "lr": optimizer.param_groups[0]["lr"], "images_per_sec": 0.0,
                                               "count": last_val.count}, wandb)
                else:
                    dist.average_buffers(raw)
                self.console.epoch_end(epoch + 1, cfg.train.epochs, train_record, val_record, seconds,
                                       best if val is not None else None, is_best)
                final = epoch + 1 == cfg.train.epochs
                every = cfg.checkpoint.every_epochs
                stop_now = dist.any_rank(stop.requested, env.device)
                if final or (every and (epoch + 1) % every == 0) or is_best or stop_now:
                    self.store.save(self._state(trainer, cfg, spec, epoch + 1, 0, None, best, wandb.run_id),
                                    epoch_file=bool(every) and ((epoch + 1) % every == 0 or final), is_best=is_best or (val is None and final))
                if stop_now:
                    raise Preempted(stop.signal_name or "a stop signal on another rank", self.store.last)
        except BaseException as exc:
            wandb.stop(preempted=isinstance(exc, Preempted))
            raise
        finally:
            stop.uninstall()
            self.console.end_epoch()

        result = trainer.evaluate(test, spec.num_classes)
        loaders = [train, test] + ([val] if val is not None else [])
        for bad in sorted({b for loader in loaders for b in loader.dropped}):
            self.console.warn(f"rank {env.rank}: skipped an image that failed to decode: {bad}")
        dropped = dist.all_reduce_sum(torch.tensor([float(sum(len(l.dropped) for l in loaders))], device=env.device))
        self._record({"epoch": cfg.train.epochs, "step": trainer.global_step, "split": "test", "loss": result.loss,
                      "acc": result.acc, "lr": optimizer.param_groups[0]["lr"], "images_per_sec": 0.0, "count": result.count}, wandb)
        summary = {
            "test_acc": result.acc, "test_loss": result.loss, "test_count": result.count,
            "best_val_acc": best if best >= 0 else None, "epochs_completed": cfg.train.epochs,
            "world_size": env.world_size, "global_batch_size": cfg.data.batch_size,
            "train_images_per_sec": train_images / train_seconds if train_seconds else None,
            "wall_time_s": time.perf_counter() - wall, "skipped_steps": trainer.skipped_steps,
            "global_step": trainer.global_step, "resumed_from": resumed_from,
            "per_class_test_acc": dict(zip(spec.class_names, result.per_class_acc)),
            "skipped_bad_images": len(data.skipped_files),
            "dropped_bad_image_reads": int(dropped.item()),
        }
        plots = {}
        if env.is_main:
            write_summary(self.out_dir, summary)
            plots = self._plots(result, raw, data, spec) if cfg.log.plots else {}
        wandb.finish(summary, trainer.global_step, plots)
        self.console.info(f"done: test acc {result.acc:.4f} on {result.count} samples"
                          + (f", best val acc {best:.4f}" if best >= 0 else "") + f"; outputs in {self.out_dir}")
        self.console.summary(summary_rows(summary, self.out_dir, plots))
        return summary

    # ----------------------------------------------------------------- helpers

    def _record(self, record: dict, wandb: WandbLogger) -> dict:
        record["time"] = time.time()
        self.metrics.write(record)
        wandb.log(record)
        return record

    def _plots(self, result, raw, data, spec) -> dict:
        """<out_dir>/plots/*.png from this run's files and final test result (rank 0); never fails the run."""
        try:
            return write_run_plots(self.out_dir, result.confusion, spec.class_names,
                                   SampleSource(raw, data.preprocess, data.splits.test, self.env.device))
        except Exception as exc:  # a plot must never cost a finished run
            self.console.warn(f"plots not written ({type(exc).__name__}: {exc}); make them with `python -m distcls.plot {self.out_dir}`")
            return {}

    def _log_interval(self, ctx: StepContext, logged: dict, optimizer, wandb: WandbLogger) -> None:
        now = time.perf_counter()
        prev: Meter = logged["meter"]
        interval = Meter(ctx.meter.loss_sum - prev.loss_sum, ctx.meter.correct - prev.correct, ctx.meter.count - prev.count)
        red = interval.reduced(self.env.device)
        record = {"epoch": ctx.epoch + 1, "step": ctx.global_step, "split": "train", "loss": red.loss, "acc": red.acc,
                  "lr": optimizer.param_groups[0]["lr"], "images_per_sec": red.count / max(now - logged["time"], 1e-9),
                  "epoch_step": ctx.epoch_step, "time": time.time()}
        self.metrics.write(record)
        wandb.log(record)
        self.console.logged(record)
        if not self.console.fancy:
            self.console.info(f"epoch {ctx.epoch + 1} step {ctx.epoch_step} loss {red.loss:.4f} acc {red.acc:.4f} "
                              f"| {record['images_per_sec']:.0f} img/s, lr {record['lr']:.3g}")
        logged["meter"], logged["time"] = Meter(**ctx.meter.state_dict()), now

    def _state(self, trainer: Trainer, cfg: Config, spec, epochs_done: int, epoch_step: int, meter: Optional[Meter],
               best: float, wandb_id, interval_meter: Optional[Meter] = None) -> dict:
        """Everything exact resume needs; only tensors and plain Python data (weights_only loadable).

        `meter`: the epoch's running sums; `interval_meter`: their value at the last `log.every_steps`
        record, so the first interval record after a mid-epoch resume covers the whole interval.
        """
        meter_state = meter.reduced(self.env.device).state_dict() if meter is not None else None
        interval_state = interval_meter.reduced(self.env.device).state_dict() if meter is not None and interval_meter is not None else None
        return {
            "model": trainer.raw_model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else {},
            "epoch": epochs_done, "epoch_step": epoch_step, "step": trainer.global_step,
            "best_metric": best, "config": cfg.to_dict(), "data_spec": spec.to_dict(), "rng": rng_state(),
            "meter": meter_state, "interval_meter": interval_state, "skipped_steps": trainer.skipped_steps, "world_size": self.env.world_size,
            "wandb_id": wandb_id, "version": 1,
        }
