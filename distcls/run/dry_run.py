"""`python -m distcls.train --dry-run ...`: everything a run checks and builds before its first epoch,
and one training step, then a one-screen report and exit 0; nothing is written (the out_dir is only
checked). Meant for the top of an sbatch script: a bad config, missing data, a model that does not
fit the data or an unwritable out_dir ends the job in seconds, with the usual one error line (exit 2),
instead of after it waited in the queue.

Collective under a launcher (every rank builds and takes the step, as a run does; rank 0 reports).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

from distcls.checkpoint import CheckpointFiles, resume_reason
from distcls.config import Config
from distcls.models import count_parameters
from distcls.run.components import build_components
from distcls.run.checks import check_resume_config, resolve_unset
from distcls.run.outputs import check_outputs
from distcls.run.runner import find_resume_point
from distcls.runtime import dist
from distcls.runtime.dist import DistEnv
from distcls.runtime.signals import StopRequest


def dry_run(cfg: Config, env: DistEnv, debug: bool = False, resume: Optional[str] = None) -> list[str]:
    """The report's lines (rank 0's); raises the run's own errors."""
    if env.is_main:  # as a run does: rank 0 writes, rank 0 checks
        check_outputs(cfg.run.out_dir)
    out_dir = Path(cfg.run.out_dir)
    # what the run would resume (reads only)
    point = find_resume_point(out_dir, CheckpointFiles(out_dir, cfg.checkpoint.keep), resume)
    cfg = resolve_unset(cfg, point, lambda msg: None)
    if point is not None:
        check_resume_config(point, cfg)
    plan = (
        f"resume from {point.path} at epoch {point.epoch + 1}, step {point.epoch_step} of the epoch"
        if point is not None
        else f"a fresh run ({resume_reason(resume)}: no checkpoint yet)"
        if resume_reason(resume)
        else "a fresh run"
    )
    started = time.perf_counter()
    notes: list[str] = []
    # the checkpointer's and the index's place: thrown away
    with tempfile.TemporaryDirectory(prefix="distcls-dry-run-") as scratch:
        parts = build_components(cfg, env, debug, CheckpointFiles(scratch, cfg.checkpoint.keep), log=notes.append)
        built = time.perf_counter() - started
        data, spec, progress = parts.data, parts.data.spec, parts.progress
        if point is not None:
            check_resume_config(point, cfg, len(data.splits.train))  # and the data it would resume on
        step_started = time.perf_counter()
        for _ in parts.trainer.train_epoch(parts.train, progress, StopRequest()):  # one step: forward, backward, update
            break
        totals = progress.agree_sums()
        step = time.perf_counter() - step_started
    total, trainable = count_parameters(parts.module)
    splits = data.splits
    lines = [
        f"config: {cfg.data.name} -> {cfg.model.name}, {cfg.train.epochs} epochs of "
        f"{parts.train.sampler.steps_per_epoch} steps, "
        f"global batch {cfg.data.batch_size}",
        f"launcher: {env.launcher}, world size {env.world_size}, {env.device.type}"
        + (f", {env.backend}" if env.distributed else ", no process group"),
        f"data: {spec.channels}x{spec.image_size}x{spec.image_size}, {spec.num_classes} classes | train "
        f"{len(splits.train)} / val {len(splits.val) if splits.val else 0} / test {len(splits.test)}",
        *[f"data: {note}" for note in data.notes],
        f"model: {total:,} parameters ({trainable:,} trainable), built with the data in {built:.1f} s"
        + (f"; {'; '.join(notes)}" if notes else ""),
        f"one training step: loss {totals.loss:.4f} on {int(totals.count)} images in {step:.2f} s",
        f"outputs: {cfg.run.out_dir} can be written (nothing was); {plan}",
        "dry run: OK",
    ]
    dist.barrier()
    return lines
