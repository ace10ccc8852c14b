"""augment: the keyed batched recipe (TrivialAugment + erasing + Mixup/CutMix) vs torchvision.transforms.v2 per image.

The same in-memory uint8 images (default 512 at 224 px, smooth patterns plus texture) go through:
- distcls: `Preprocess.train_batch` in the training process on `--device` (policy, normalization,
  erasing, Mixup/CutMix; every choice keyed by (seed, epoch, sample)), batches of `--batch`, on the
  CPU into one reused float buffer as the Trainer lends it;
- torchvision: a DataLoader with `--workers` workers, each image through
  v2.TrivialAugmentWide(bilinear) -> ToDtype(float32, scale) -> Normalize -> RandomErasing(p), and
  v2.RandomChoice([MixUp(0.2), CutMix(1.0)]) in the collate function (the reference recipe's way).
Reported: images/s of each (best of `--repeats` alternating timed epochs after a warm-up), and per
core (distcls: the training process's torch threads; torchvision: its workers, one thread each).
With `--device cuda`, also a ResNet-50 bf16 training step at the same batch and the augmentation's
share of it. Numbers are never test thresholds.
"""
from __future__ import annotations

import time

import torch

from distcls.bench.common import MEAN, STD, machine


def add_arguments(p) -> None:
    p.add_argument("--images", type=int, default=512, help="in-memory uint8 images")
    p.add_argument("--size", type=int, default=224, help="image size")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the torchvision pipeline")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed epochs of each pipeline")
    p.add_argument("--erase-prob", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the device distcls augments on)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads of the distcls process (DataLoader workers use 1 each)"
    )


def make_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.rand(n, 3, 1, 1, generator=g) * 6
    img = 127.5 + 90 * torch.sin(xx * 7 + base) * torch.cos(yy * 5 + 2 * base)
    noise = torch.nn.functional.interpolate(
        torch.rand(n, 3, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear"
    )
    return (img + (noise - 0.5) * 60).round().clamp(0, 255).to(torch.uint8)


class _TorchvisionImages(torch.utils.data.Dataset):
    def __init__(self, images, labels, erase_prob):
        from torchvision.transforms import v2
        self.images, self.labels = images, labels
        self.transform = v2.Compose([v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR),
                                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
                                     v2.RandomErasing(p=erase_prob)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


class _MixCollate:
    def __init__(self, num_classes):
        from torchvision.transforms import v2

        self.mix = v2.RandomChoice(
            [v2.MixUp(alpha=0.2, num_classes=num_classes), v2.CutMix(alpha=1.0, num_classes=num_classes)]
        )

    def __call__(self, batch):
        return self.mix(*torch.utils.data.default_collate(batch))


def _torchvision_epoch(loader) -> int:
    n = 0
    for x, _ in loader:
        n += len(x)
    return n


def _distcls_epoch(pre, images, labels, batch, epoch, device) -> int:
    n = 0
    buffer = torch.empty((batch, *images.shape[1:])) if device.type == "cpu" else None  # as the Trainer lends it
    for lo in range(0, len(images) - batch + 1, batch):
        keys = torch.arange(lo, lo + batch, device=device)
        x, t = pre.train_batch(images[lo:lo + batch], labels[lo:lo + batch], keys, epoch, out=buffer)
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


def _resnet50_step_s(batch: int, size: int, device) -> float:
    import torchvision
    model = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for i in range(8):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return min(times)


def run(args) -> dict:
    from distcls.config import AugmentConfig, MixConfig
    from distcls.data.transforms.augment import Preprocess
    from distcls.data.transforms.mix import Mix

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    classes = 10
    images = make_images(args.images, args.size)
    labels = torch.arange(args.images) % classes
    aug = AugmentConfig(policy="trivialaugment", erase_prob=args.erase_prob)
    mix = Mix.from_config(MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0), 0.1, classes, args.size, 0, args.images)
    pre = Preprocess(3, args.size, MEAN, STD, aug, 0, args.images, mix)
    dev_images, dev_labels = images.to(device), labels.to(device)
    loader = torch.utils.data.DataLoader(
        _TorchvisionImages(images, labels, args.erase_prob),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=_MixCollate(classes),
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    _distcls_epoch(pre, dev_images, dev_labels, args.batch, 0, device)  # warm-up (and the epoch-0 table)
    _torchvision_epoch(loader)
    ours, theirs = [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        n = _distcls_epoch(pre, dev_images, dev_labels, args.batch, r + 1, device)
        ours.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        n = _torchvision_epoch(loader)
        theirs.append(n / (time.perf_counter() - t))
    threads = args.threads if device.type == "cpu" else 1
    result = {
        "machine": machine(),
        "device": str(device),
        "images": args.images,
        "size": args.size,
        "batch": args.batch,
        "recipe": (
            f"TrivialAugmentWide + RandomErasing({args.erase_prob}) + MixUp(0.2)/CutMix(1.0), label smoothing 0.1"
        ),
        "distcls_images_per_s": max(ours),
        "distcls_cores": threads,
        "torchvision_images_per_s": max(theirs),
        "torchvision_workers": args.workers,
        "distcls_per_core": max(ours) / threads,
        "torchvision_per_core": max(theirs) / max(1, args.workers),
    }
    result["per_core_ratio"] = result["distcls_per_core"] / result["torchvision_per_core"]
    if device.type == "cuda":
        step = _resnet50_step_s(args.batch, args.size, device)
        aug_s = args.batch / max(ours)
        result.update(
            {"resnet50_bf16_step_s": step, "augment_s_per_batch": aug_s, "augment_share_of_step": aug_s / step}
        )
    return result


def render(result: dict) -> None:
    import json
    print(json.dumps(result, indent=2))
    print(
        "\n| pipeline | images/s | cores | images/s per core |\n|---|---|---|---|\n| distcls keyed, batched on "
        f"{result['device']} | {result['distcls_images_per_s']:.0f} | {result['distcls_cores']} | "
        f"{result['distcls_per_core']:.0f} |\n| torchvision v2 per image, {result['torchvision_workers']} workers | "
        f"{result['torchvision_images_per_s']:.0f} | {result['torchvision_workers']} | "
        f"{result['torchvision_per_core']:.0f} |"
    )
