"""The hand-written DDP loop that `scaling` runs beside distcls (one process, or one per rank under torchrun).

`python -m distcls.bench.ddp_loop --out FILE [--config F] [--epochs E] [key=value ...]`: the same
config's model, data, optimizer, AMP, clipping and augmentation; plain DistributedDataParallel
(its defaults) over gloo/NCCL when WORLD_SIZE > 1; each rank takes its slice of every global
batch of a shared permutation. The first epoch is warm-up; images/s of the other epochs go to FILE.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from distcls.cli import ArgumentParser, exit_with


def _batches(images, labels, global_batch: int, world: int, rank: int, device, loop, seed: int):
    import torch

    local, n = global_batch // world, len(labels)
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for step in range(n // global_batch):
            idx = perm[step * global_batch + rank * local: step * global_batch + (rank + 1) * local].to(device)
            yield loop.preprocess(images[idx]), labels[idx]
        epoch += 1


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m distcls.bench.ddp_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--config")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as tdist

    from distcls import config as config_mod
    from distcls.runtime import dist
    from distcls.bench.handwritten import HandLoop, timed_steps
    from distcls.data import build_data
    from distcls.models import build_model

    cfg = config_mod.load(args.config, args.overrides)
    env = dist.detect(cfg.dist.device, cfg.dist.backend)
    torch.manual_seed(cfg.run.seed)
    if env.distributed:
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)
        tdist.init_process_group(env.backend)
    try:
        from distcls.models.weights import with_pretrained_preprocessing
        data = build_data(with_pretrained_preprocessing(cfg))
        view = data.splits.train
        model = build_model(cfg.model, data.spec).to(env.device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            model = torch.compile(model)
        if env.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None
            )
        loop = HandLoop(model, cfg, env.device, data.spec.mean, data.spec.std)
        images = view.source.images[view.indices].to(env.device)
        labels = view.source.labels[view.indices].to(env.device)
        steps_per_epoch = len(labels) // cfg.data.batch_size
        if cfg.train.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
        batches = _batches(
            images, labels, cfg.data.batch_size, env.world_size, env.rank, env.device, loop, cfg.run.seed
        )
        local_ips = timed_steps(batches, loop.step, steps_per_epoch, (args.epochs - 1) * steps_per_epoch, env.device)
        if env.rank == 0:
            from distcls.runtime.atomic_files import atomic_write_text
            atomic_write_text(
                args.out,
                json.dumps(
                    {
                        "world_size": env.world_size,
                        "images_per_sec": local_ips * env.world_size,
                        "steps_per_epoch": steps_per_epoch,
                        "timed_epochs": args.epochs - 1,
                    }
                )
                + "\n",
            )
    finally:
        if env.distributed:
            tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_with(main)
