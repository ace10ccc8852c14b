"""torchvision's reference training step, written for the bench (one process, or one per rank under torchrun).

`python -m distcls.bench.reference_loop --root DIR --out FILE [--epochs E] [--batch B] [--workers W] ...`
does per step what torchvision's `references/classification/train.py` does with
`--auto-augment ta_wide --random-erase P --mixup-alpha 0.2 --cutmix-alpha 1.0 --label-smoothing 0.1
--model-ema --model-ema-steps 32 --norm-weight-decay 0.0 --use-v2` (its presets.py, PIL backend):
- `ImageFolder(DIR/train)`, each image in the DataLoader workers through RandomResizedCrop -> RandomHorizontalFlip
  -> TrivialAugmentWide -> PILToTensor -> ToDtype(float32, scale) -> Normalize -> RandomErasing -> ToPureTensor;
- `DistributedSampler(shuffle=True)` under torchrun; the collate function applies RandomChoice([MixUp, CutMix])
  to each batch (in the workers, as the reference's collate_fn);
- DistributedDataParallel (its defaults), SGD with momentum over `set_weight_decay`'s groups, CrossEntropyLoss
  with label smoothing, the model EMA (`torch.optim.swa_utils.AveragedModel`) every `--ema-steps`, the per-step
  `loss.item()` and accuracy reads of its MetricLogger, the schedule stepped once per epoch.
The batch is the global batch (each rank B / world size, as distcls's data.batch_size). The first epoch is
warm-up; images/s (global) of the others, each timed from the epoch's start to its last step as distcls's
metrics.jsonl times them, go to FILE as JSON.
"""
from __future__ import annotations

import json
import os
import time
from typing import Sequence

from distcls.bench.common import MEAN, STD
from distcls.cli import ArgumentParser, exit_with


def _train_transform(crop: int, erase_prob: float):
    import torch
    from torchvision.transforms import v2

    bilinear = v2.InterpolationMode.BILINEAR
    return v2.Compose(
        [
            v2.RandomResizedCrop(crop, interpolation=bilinear, antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.TrivialAugmentWide(interpolation=bilinear),
            v2.PILToTensor(),
            v2.ToDtype(torch.float, scale=True),
            v2.Normalize(MEAN, STD),
            v2.RandomErasing(erase_prob),
            v2.ToPureTensor(),
        ]
    )


class MixCollate:
    """The reference's collate_fn: default_collate, then RandomChoice([MixUp(alpha), CutMix(alpha)])."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
        from torchvision.transforms import v2
        self.mix = v2.RandomChoice([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes),
                                    v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)])

    def __call__(self, batch):
        import torch
        return self.mix(*torch.utils.data.default_collate(batch))


def _parameter_groups(model, weight_decay: float, norm_weight_decay: float) -> list:
    """The reference's utils.set_weight_decay with --norm-weight-decay (normalization layers' parameters apart)."""
    import torch

    norm_classes = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
                    torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)
    norm, other = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        (norm if isinstance(module, norm_classes) else other).extend(params)
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm, "weight_decay": norm_weight_decay}]


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m distcls.bench.reference_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="image folder with train/<class>/*")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--erase-prob", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-steps", type=int, default=32, help="--model-ema-steps (torchvision's default 32)")
    p.add_argument("--persistent-workers", action="store_true",
                   help="keep the workers between epochs (torchvision's reference makes them anew each epoch)")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as tdist
    import torchvision

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )
    torch.manual_seed(args.seed)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        dataset = torchvision.datasets.ImageFolder(
            os.path.join(args.root, "train"), _train_transform(args.crop, args.erase_prob)
        )
        classes = len(dataset.classes)
        sampler = (
            torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed)
            if world > 1
            else torch.utils.data.RandomSampler(dataset)
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch // world,
            sampler=sampler,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            collate_fn=MixCollate(classes, 0.2, 1.0),
            drop_last=True,
            persistent_workers=args.persistent_workers and args.workers > 0,
        )
        model = getattr(torchvision.models, args.model)(num_classes=classes).to(device)
        ddp = (
            torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
            if world > 1
            else model
        )
        optimizer = torch.optim.SGD(_parameter_groups(model, 2e-5, 0.0), lr=args.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        ema = torch.optim.swa_utils.AveragedModel(
            model, device=device, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999), use_buffers=True
        )
        seen = 0.0
        rates = []
        for epoch in range(args.epochs):
            if world > 1:
                sampler.set_epoch(epoch)
            ddp.train()
            started, steps = time.perf_counter(), 0
            for i, (image, target) in enumerate(loader):
                image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
                output = ddp(image)  # fp32, as the script without --amp (and distcls with train.amp=none)
                loss = criterion(output, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if i % args.ema_steps == 0:
                    ema.update_parameters(model)
                hard = target.max(dim=1)[1] if target.ndim == 2 else target  # utils.accuracy with mixed targets
                acc1 = (output.argmax(1) == hard).float().mean() * 100
                seen += loss.item() + acc1.item()  # MetricLogger.update reads both every step
                steps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            if epoch > 0:
                rates.append(steps * args.batch / (time.perf_counter() - started))
            scheduler.step()
        if rank == 0:
            from distcls.runtime.atomic_files import atomic_write_text
            atomic_write_text(args.out, json.dumps({"world_size": world, "images_per_sec_per_epoch": rates,
                                                    "steps_per_epoch": steps}) + "\n")
    finally:
        if world > 1:
            tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_with(main)
