"""One training run, start to finish: builds the components (components.py) and restores, sets up
the outputs and announces (`_setup`), runs the epoch loop (`_loop`, one screen), and writes the results.

Functions that communicate say "Collective" in their docstring; each is called on every rank at
the same point of the run, so none can hang on a rank that skipped it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from distcls import config as config_mod
from distcls.runtime import dist
from distcls.runtime.atomic_files import atomic_write_text
from distcls.checkpoint import CheckpointFiles, ResumePoint, SaveReason, read_checkpoint, resume_reason
from distcls.run.components import Components, build_components
from distcls.config import Config
from distcls.runtime.copies import HostCopy
from distcls.runtime.dist import DistEnv
from distcls.engine import EvalResult, Progress, Totals, evaluate
from distcls.errors import UserError
from distcls.models import count_parameters
from distcls.run.outputs import RunDirLock, check_outputs
from distcls.run.checks import check_resume_config, check_skipped_steps, resolve_unset
from distcls.runtime.signals import StopRequest
from distcls.tracking import (
    Console, MetricsLog, TensorBoardLogger, WandbLogger, metric_record, summary_rows, write_summary,
)
from distcls.tracking.plots import SampleSource, write_run_plots


@dataclass(frozen=True)
class EpochEnd:
    """What an epoch's end found: a new best validation accuracy; a stop agreed by every rank."""
    new_best: bool
    stop: bool


@dataclass
class Stopped:
    """The run stopped at a step boundary on a signal; `checkpoint` resumes it exactly."""
    signal_name: str
    checkpoint: Optional[Path]


def _has_per_rank_batchnorm(module: nn.Module) -> bool:
    """BatchNorm layers that train on each rank's share of the batch alone (not SyncBatchNorm, not frozen)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm) and m.training
               and m.track_running_stats for m in module.modules())


def existing_outputs(out_dir: Path, files: CheckpointFiles) -> Optional[str]:
    """What of a run `out_dir` already holds (checkpoints, summary.json, metrics.jsonl), or None."""
    if files.has_checkpoints():
        return "checkpoints"
    for name in ("summary.json", "metrics.jsonl"):
        p = out_dir / name
        if p.is_file() and p.stat().st_size:
            return name
    return None


def find_resume_point(out_dir: Path, files: CheckpointFiles, flag: Optional[str]) -> Optional[ResumePoint]:
    """Where a run resumes (--resume PATH|auto, a torchrun restart or SLURM requeue), None for a fresh start;
    a UserError for a fresh start over another run's outputs, or a checkpoint that cannot be used (reads only)."""
    reason = resume_reason(flag)
    if reason is None:
        existing = existing_outputs(out_dir, files)
        if existing:
            raise UserError(
                f"run.out_dir={out_dir} already holds {existing} of a run; pass --resume auto to continue it, "
                "or choose another run.out_dir (nothing was overwritten)")
        return None
    if flag and flag != "auto":
        return ResumePoint(Path(flag), read_checkpoint(flag, "--resume"))
    return files.find_latest()  # an error if checkpoints exist but none is usable: never overwrite them


class TrainingRun:
    def __init__(self, cfg: Config, env: DistEnv, resume: Optional[str] = None, debug: bool = False):
        self.cfg, self.env, self.debug = cfg, env, debug
        self.out_dir = Path(cfg.run.out_dir)
        self.console = Console(env.rank, cfg.log.console)
        self.files = CheckpointFiles(self.out_dir, cfg.checkpoint.keep, warn=self._warn_main)
        self.metrics = MetricsLog(self.out_dir, env.is_main)
        self.lock = RunDirLock(self.out_dir)
        self._interval_start = 0.0  # perf_counter at the last log.every_steps record (or the epoch's start)
        self._train_images, self._train_seconds = 0, 0.0  # this process's training throughput, for the summary
        self._bar_copy, self._bar_time = None, 0.0  # the progress bar's in-flight copy of the running sums
        self.wandb: Optional[WandbLogger] = None  # started by _setup
        self.sinks: list = []  # where records go besides metrics.jsonl (wandb, TensorBoard): log, finish, stop
        self.resumed_from: Optional[dict] = None  # what summary.json says of the resume point
        if env.is_main:  # rank 0 writes: it checks the outputs and holds the out_dir for the run's lifetime
            check_outputs(self.out_dir)
            self.lock.acquire()
            if not self.lock.supported:
                self.console.warn(
                    f"{self.out_dir}: this filesystem does not support file locks; make sure no other run writes there"
                )
            for stale in self.lock.remove_stale_temps():
                self.console.warn(f"removed {stale}: the temp file of a save that was killed")
        try:
            self.resume_point = self._find_resume(resume)
            # e.g. data.carve_val as the checkpoint meant it
            self.cfg = resolve_unset(cfg, self.resume_point, self._warn_main)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release run.out_dir (also called at the end of `run`)."""
        self.lock.release()

    def _warn_main(self, msg: str) -> None:
        if self.env.is_main:
            self.console.warn(msg)

    # ----------------------------------------------------------------- what to resume

    def _find_resume(self, flag: Optional[str]) -> Optional[ResumePoint]:
        found = find_resume_point(self.out_dir, self.files, flag)
        if found is None and resume_reason(flag) is not None:
            self.console.info(f"{resume_reason(flag)}: no checkpoint in {self.files.dir}, starting fresh")
            old_default = Path("runs/default")
            if self.out_dir != old_default and CheckpointFiles(old_default, 1).has_checkpoints():
                self._warn_main(
                    f"{old_default} holds checkpoints: a config without run.out_dir wrote there before each config got "
                    "its own (runs/<config name>); to continue that run, stop this one and pass "
                    f"run.out_dir={old_default}"
                )
        return found

    def _finished_summary(self) -> Optional[dict]:
        """The summary of this out_dir's run when the resume point is its final checkpoint and it was written."""
        point = self.resume_point
        # more epochs than train.epochs: refused at the restore
        if point is None or point.epoch != self.cfg.train.epochs or point.epoch_step:
            return None
        try:
            summary = json.loads((self.out_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return None  # stopped between the final checkpoint and the summary: evaluate the test split again
        if not isinstance(summary, dict) or summary.get("global_step") != point.global_step:
            return None
        return summary

    # ----------------------------------------------------------------- the run

    def run(self, stop: Optional[StopRequest] = None) -> Union[dict, Stopped]:
        """Collective. The summary of the finished run, or `Stopped` (a checkpoint was saved).

        Stop signals are caught from here on (`stop`, installed now; a caller that passes its own
        keeps it installed after the run, see train.main): one during the setup stops the run at
        its first step, one in the loop at the step boundary, one after the last training step lets
        the run finish (test evaluation, summary, plots: bounded work a resume would only redo)."""
        own_stop = stop is None
        stop = (stop or StopRequest()).install()
        try:
            finished = self._finished_summary()
            if finished is not None:
                self.console.info(
                    f"the run in {self.out_dir} already finished ({self.cfg.train.epochs} epochs, "
                    f"test acc {finished.get('test_acc')}); nothing to do. Raise train.epochs to train longer"
                )
                return finished
            wall = time.perf_counter()
            parts = self._setup()
            try:
                stopped = self._loop(parts, stop)
            except BaseException:
                for sink in self.sinks:
                    sink.stop(preempted=False)
                raise
            finally:
                self.console.end_epoch()
            if stopped is not None:
                for sink in self.sinks:
                    sink.stop(preempted=True)
                return stopped
            return self._finish(parts, wall)
        finally:
            if own_stop:
                stop.uninstall()
            self.close()

    def _loop(self, parts: Components, stop: StopRequest) -> Optional[Stopped]:
        """Collective. The epochs from the resume point on; `Stopped` when a signal ended the run."""
        cfg, progress, checkpointer = self.cfg, parts.progress, parts.checkpointer
        saved = None
        self._skipped_before = progress.skipped_steps  # steps skipped before this process's first epoch
        while progress.epoch < cfg.train.epochs and not stop.agreed:
            first_step, started = progress.epoch_step, time.perf_counter()
            self._start_epoch(parts, started)
            # one optimizer step each, queued on the device
            for _ in parts.trainer.train_epoch(parts.train, progress, stop):
                self._advance_bar(parts)
                if cfg.log.every_steps and progress.global_step % cfg.log.every_steps == 0:
                    self._log_train_interval(parts)  # Collective: reads the running sums of every rank
                if not stop.agreed:  # (a stop is saved below, where the loop ends)
                    checkpointer.maybe_save(SaveReason.STEP)  # Collective; checkpoint.every_steps
            self.console.end_epoch()
            if stop.agreed and progress.mid_epoch:  # stopped inside the epoch: saved exactly there, no epoch end
                saved = checkpointer.maybe_save(SaveReason.STOP)
            else:
                steps = progress.epoch_step - first_step
                end = self._end_epoch(
                    parts, stop, images=steps * cfg.data.batch_size, seconds=time.perf_counter() - started
                )
                self._check_skipped(progress, progress.epoch + 1, steps)  # may stop the run: before this epoch's save
                progress.finish_epoch()  # from here a save resumes at the next epoch's start
                saved = checkpointer.maybe_save(SaveReason.STOP if end.stop else SaveReason.EPOCH_END, end.new_best)
        if stop.agreed:
            # every rank stops; only rank 0 wrote the file (and knows it was written: non-finite weights are not)
            return Stopped(stop.signal_name or "a stop signal on another rank", saved or self.files.last)
        return None

    def _check_skipped(self, progress: Progress, epoch: int, steps: int) -> None:
        """train.nonfinite=skip: warn about this epoch's skipped steps; stop when they dominate (run_checks)."""
        total = progress.skipped_steps  # agreed on every rank: every rank warns or raises alike
        skipped, self._skipped_before = total - self._skipped_before, total
        check_skipped_steps(epoch, skipped, steps, self.cfg.train, self._warn_main, total)

    # ----------------------------------------------------------------- setup

    def _setup(self) -> Components:
        """Collective: build the components, restore the resume point, set up the outputs, announce."""
        parts = build_components(self.cfg, self.env, self.debug, self.files, self.console.info)
        self.resumed_from = self._restore(parts) if self.resume_point is not None else None
        self._prepare_outputs(parts.progress)
        self.wandb = WandbLogger(self.cfg.log.wandb, str(self.out_dir), self.cfg.to_dict(), self.env.is_main,
                                 parts.progress.wandb_id, warn=self.console.warn, info=self.console.info)
        # kept in every checkpoint: a resumed run continues the same wandb run
        parts.progress.wandb_id = self.wandb.run_id
        tensorboard = TensorBoardLogger(self.out_dir, self.env.is_main and self.cfg.log.tensorboard,
                                        self.resume_point.global_step if self.resume_point is not None else None)
        self.sinks = [self.wandb, tensorboard]
        self._announce(parts)
        return parts

    def _restore(self, parts: Components) -> dict:
        """Every component from the resume point (every rank reads it); what `summary.json` says of it."""
        point = self.resume_point
        parts.checkpointer.load(point)  # refuses another model, optimizer or data shape
        # then a changed position, schedule or data (nothing written yet)
        check_resume_config(point, self.cfg, len(parts.data.splits.train))
        return {
            "path": str(point.path),
            "epoch": point.epoch,
            "epoch_step": point.epoch_step,
            "step": point.global_step,
            "world_size": point.world_size or self.env.world_size,
        }

    def _prepare_outputs(self, progress: Progress) -> None:
        """Rank 0: config.yaml, and metrics.jsonl without the records past the resume point."""
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.yaml", config_mod.to_yaml(self.cfg))
            self.metrics.truncate_after(progress.global_step if self.resumed_from else -1)

    def _announce(self, parts: Components) -> None:
        cfg, env, data, spec, progress = self.cfg, self.env, parts.data, parts.data.spec, parts.progress
        for note in data.notes:  # what building the data did (an image folder's index, its splits); warnings to stderr
            self._warn_main(note.removeprefix("warning: ")) if note.startswith("warning: ") else self.console.info(note)
        for bad in data.skipped_files[:5]:
            self._warn_main(f"skipped bad image {bad}")
        if len(data.skipped_files) > 5:
            self._warn_main(
                f"... and {len(data.skipped_files) - 5} more bad images skipped (data.skip_bad_images=true)"
            )
        total, trainable = count_parameters(parts.module)
        self.console.info(
            f"distcls: {cfg.model.name} ({total:,} parameters, {trainable:,} trainable) on {cfg.data.name} "
            f"{spec.channels}x{spec.image_size}x{spec.image_size}, {spec.num_classes} classes | train "
            f"{len(data.splits.train)} / val {len(data.splits.val) if data.splits.val else 0} / test "
            f"{len(data.splits.test)} | world {env.world_size} ({env.launcher}, {env.device.type}, "
            f"{env.backend if env.distributed else 'no process group'}) | global batch {cfg.data.batch_size}, "
            f"{parts.train.sampler.steps_per_epoch} steps/epoch"
        )
        per_rank_bn = _has_per_rank_batchnorm(parts.module)
        if per_rank_bn and env.world_size > 1:
            self._warn_main(
                f"{cfg.model.name} has BatchNorm layers that normalize each rank's "
                f"{cfg.data.batch_size // env.world_size} images on their own "
                f"(train.sync_bn=false{'; SyncBatchNorm needs CUDA GPUs' if env.device.type != 'cuda' else ''}): its "
                f"weights depend on the world size ({env.world_size}), unlike a model without BatchNorm"
            )
        resumed = self.resumed_from
        if resumed:
            self.console.info(
                f"resumed from {resumed['path']} at epoch {progress.epoch + 1}, step {progress.epoch_step} of the epoch"
            )
            if resumed["world_size"] != env.world_size:
                self.console.info(
                    f"the checkpoint was saved at world size {resumed['world_size']}; resuming at world size "
                    f"{env.world_size} (same global batch {cfg.data.batch_size}, same sample order)"
                )
                if per_rank_bn:
                    self._warn_main(
                        f"{cfg.model.name}'s BatchNorm normalizes per rank: from here on the run differs from one "
                        f"that stays at world size {resumed['world_size']} (set train.sync_bn=true on GPUs to avoid it)"
                    )

    # ----------------------------------------------------------------- records

    def _record(self, parts: Components, split: str, epoch: int, totals: Union[Totals, EvalResult], **extra) -> dict:
        """One metrics.jsonl line (rank 0) and wandb entry; the only place records are assembled."""
        record = metric_record(split, epoch, parts.progress.global_step, totals.loss, totals.acc, parts.lr, **extra)
        self.metrics.write(record)
        for sink in self.sinks:
            sink.log(record)
        return record

    BAR_READ_SECONDS = 0.5

    def _advance_bar(self, parts: Components) -> None:
        """The terminal bar (rank 0). Its running loss/accuracy are rank 0's own sums, copied to the
        host without waiting every BAR_READ_SECONDS and shown once the copy has landed: no stall, no
        collective."""
        sums = ()
        if self.console.fancy:
            if self._bar_copy is not None and self._bar_copy.ready():
                sums, self._bar_copy = self._bar_copy.values(), None
            now = time.perf_counter()
            if self._bar_copy is None and now - self._bar_time >= self.BAR_READ_SECONDS:
                self._bar_copy, self._bar_time = HostCopy(parts.progress.epoch_sums.values.clone()), now
        self.console.advance(*sums, lr=parts.lr)

    def _log_train_interval(self, parts: Components) -> None:
        """Collective: the train record of the steps since the previous one (log.every_steps)."""
        progress, now = parts.progress, time.perf_counter()
        totals = progress.agree_sums()
        interval = totals.minus(progress.logged_totals)
        record = self._record(parts, "train", progress.epoch + 1, interval, epoch_step=progress.epoch_step,
                              images_per_sec=interval.count / max(now - self._interval_start, 1e-9))
        progress.logged_totals, self._interval_start = totals, now
        self.console.logged(record)
        if not self.console.fancy:
            self.console.info(
                f"epoch {progress.epoch + 1} step {progress.epoch_step} loss {interval.loss:.4f} acc "
                f"{interval.acc:.4f} | {record['images_per_sec']:.0f} img/s, lr {record['lr']:.3g}"
            )

    def _start_epoch(self, parts: Components, started: float) -> None:
        self._interval_start = started
        self.console.start_epoch(parts.progress.epoch, self.cfg.train.epochs, parts.train.sampler.steps_per_epoch,
                                 parts.progress.epoch_step, self.cfg.data.batch_size)

    def _end_epoch(self, parts: Components, stop: StopRequest, images: int, seconds: float) -> EpochEnd:
        """Collective: the epoch's train record, BatchNorm statistics averaged (the one place they
        are), validation, and a stop signal agreed (one that came during the evaluation too)."""
        progress, cfg = parts.progress, self.cfg
        epoch = progress.epoch + 1
        for target in parts.targets:  # BatchNorm statistics: every rank evaluates and saves the same weights (and EMA)
            dist.average_buffers(target.module)
        train_record = self._record(
            parts,
            "train",
            epoch,
            progress.agree_sums(),
            images_per_sec=images / max(seconds, 1e-9),
            skipped_steps=progress.skipped_steps,
        )
        self._train_images, self._train_seconds = self._train_images + images, self._train_seconds + seconds
        new_best, val_record = False, None
        if parts.val is not None:
            results = self._evaluate_targets(parts, parts.val)
            # best.pt: val_acc, val_ema_acc
            followed = results[cfg.checkpoint.best_metric.removeprefix("val_").removesuffix("acc")]
            new_best = followed is not None and followed.acc > progress.best_metric
            if followed is not None:
                progress.best_metric = max(progress.best_metric, followed.acc)
            result = results[""]
            val_record = self._record(
                parts, "val", epoch, result, count=result.count, **self._target_fields(parts, results)
            )
        self._bar_copy = None  # a copy of this epoch's sums must not show on the next epoch's bar
        self.console.epoch_end(
            epoch,
            cfg.train.epochs,
            train_record,
            val_record,
            seconds,
            progress.best_metric if parts.val is not None and progress.best_metric >= 0 else None,
            new_best,
        )
        return EpochEnd(new_best=new_best, stop=stop.agree(self.env.device))

    def _evaluate(self, parts: Components, module, loader) -> EvalResult:
        """Collective: `module` (the weights or the EMA) on `loader`, every sample counted once."""
        return evaluate(module, loader, parts.data.preprocess, parts.data.spec.num_classes, parts.precision.dtype,
                        parts.trainer.memory_format)

    def _evaluate_targets(self, parts: Components, loader) -> dict:
        """Collective: {prefix: EvalResult} of every evaluation target on `loader`; None for one not ready
        (an EMA that has not updated yet is the initial weights: neither evaluated nor followed by best.pt)."""
        return {t.prefix: self._evaluate(parts, t.module, loader) if t.ready() else None for t in parts.targets}

    @staticmethod
    def _target_fields(parts: Components, results: dict) -> dict:
        """The other targets' numbers beside the weights' in a val/test record: <prefix>loss, <prefix>acc, and their own
        fields."""
        fields = {}
        for t in parts.targets[1:]:
            result = results[t.prefix]
            fields.update(
                t.fields(), **({} if result is None else {f"{t.prefix}loss": result.loss, f"{t.prefix}acc": result.acc})
            )
        return fields

    # ----------------------------------------------------------------- the end

    def _finish(self, parts: Components, wall: float) -> dict:
        """Collective: test evaluation, summary.json, plots, wandb summary."""
        cfg, env, progress, spec = self.cfg, self.env, parts.progress, parts.data.spec
        results = self._evaluate_targets(parts, parts.test)
        result = results[""]
        loaders = parts.loaders
        for bad in sorted({b for loader in loaders for b in loader.dropped}):
            self.console.warn(f"rank {env.rank}: skipped an image that failed to decode: {bad}")
        dropped = dist.all_reduce_sum(
            torch.tensor([float(sum(len(loader.dropped) for loader in loaders))], device=env.device)
        )
        self._record(parts, "test", cfg.train.epochs, result, count=result.count, **self._target_fields(parts, results))
        best = progress.best_metric
        summary = {
            "test_acc": result.acc,
            "test_loss": result.loss,
            "test_count": result.count,
            "best_val_acc": best if best >= 0 else None,
            "best_metric": cfg.checkpoint.best_metric,
            "epochs_completed": cfg.train.epochs,
            "world_size": env.world_size,
            "global_batch_size": cfg.data.batch_size,
            "train_images_per_sec": self._train_images / self._train_seconds if self._train_seconds else None,
            "wall_time_s": time.perf_counter() - wall,
            "skipped_steps": progress.skipped_steps,
            "global_step": progress.global_step,
            "resumed_from": self.resumed_from,
            "per_class_test_acc": dict(zip(spec.class_names, result.per_class_acc)),
            "skipped_bad_images": len(parts.data.skipped_files),
            "dropped_bad_image_reads": int(dropped.item()),
            "provenance": parts.provenance,
            **{
                f"{prefix}test_{name}": getattr(r, name)
                for prefix, r in results.items()
                if prefix and r is not None
                for name in ("acc", "loss")
            },
        }
        plots = {}
        if env.is_main:
            write_summary(self.out_dir, summary)
            plots = self._plots(result, parts) if cfg.log.plots else {}
        for sink in self.sinks:
            sink.finish(summary, progress.global_step, plots)
        self.console.info(f"done: test acc {result.acc:.4f} on {result.count} samples"
                          + (f", best val acc {best:.4f}" if best >= 0 else "") + f"; outputs in {self.out_dir}")
        self.console.summary(summary_rows(summary, self.out_dir, plots))
        return summary

    def _plots(self, result: EvalResult, parts: Components) -> dict:
        """<out_dir>/plots/*.png from this run's files and final test result (rank 0); never fails the run."""
        try:
            return write_run_plots(
                self.out_dir,
                result.confusion,
                parts.data.spec.class_names,
                SampleSource(parts.module, parts.data.preprocess, parts.data.splits.test, self.env.device),
            )
        except Exception as exc:  # a plot must never cost a finished run
            self.console.warn(
                f"plots not written ({type(exc).__name__}: {exc}); make them with `python -m distcls.plot "
                f"{self.out_dir}`"
            )
            return {}
