"""imagefolder: distcls's image-folder input pipeline against torchvision ImageFolder + transforms.v2.

Writes a folder of JPEGs (default 2,000 of 300-500 px, 10 classes) under a temp dir, then measures
at the same worker count, alternating the two pipelines `--repeats` times (the machine is shared):
- pipeline images/s (no model): a timed epoch after a warm-up epoch, persistent workers for both.
  distcls: torchvision.io decoding, keyed RandomResizedCrop (crop before resize), uint8 batches,
  then flip + normalization batched in the main process. torchvision: its reference recipe,
  ImageFolder (PIL) -> RandomResizedCrop -> RandomHorizontalFlip -> PILToTensor -> ToDtype(float)
  -> Normalize in the workers.
- end-to-end train images/s: the same loaders feeding `--steps` SGD steps of a torchvision
  ResNet (`--model`), fp32 on the CPU (`--amp bf16 --channels-last` for the GPU recipe), beside
  the same steps on one random batch already on the device: the model's synthetic-input capacity
  (each loader's ratio to it is what the input pipeline leaves of the model's speed).
- with `--transfer`: `python -m distcls.train` train images/s of the seed D configs (frozen
  backbone vs fine-tuning) on the same folder, from a generated ResNet-18 weights file.
Numbers are printed as JSON; they are never test thresholds.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distcls.bench.common import MEAN, STD


def add_arguments(p) -> None:
    p.add_argument("--images", type=int, default=2000, help="JPEG files to generate")
    p.add_argument("--classes", type=int, default=10, help="class folders")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (the same for both pipelines)")
    p.add_argument("--batch", type=int, default=64, help="batch size of the pipeline measurement")
    p.add_argument("--size", type=int, default=224, help="crop size")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed repetitions of each pipeline")
    p.add_argument(
        "--model", default="resnet18", choices=["resnet18", "resnet50"], help="model of the end-to-end measurement"
    )
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of the end-to-end measurement (0 = skip it)")
    p.add_argument("--train-batch", type=int, default=32, help="batch of the end-to-end measurement")
    p.add_argument(
        "--amp", default="none", choices=["none", "bf16"], help="autocast dtype of the end-to-end measurement"
    )
    p.add_argument(
        "--channels-last", action="store_true", help="channels_last model and inputs in the end-to-end measurement"
    )
    p.add_argument("--root", help="measure this existing image folder (<root>/<class>/*.jpg) instead of generating one")
    p.add_argument(
        "--transfer", action="store_true", help="also time distcls.train with the seed D frozen and fine-tuning configs"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (with cuda also --gpu-decode on/off is measured)")


def write_jpegs(root: Path, n: int, classes: int, seed: int = 0) -> Path:
    """n JPEGs of 300-500 px per side (quality 90), photo-like: smooth class patterns plus texture."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(classes, 6, 6, 3)).astype(np.uint8)
    for i in range(n):
        label = i % classes
        w, h = (int(v) for v in rng.integers(300, 501, size=2))
        base = np.asarray(Image.fromarray(protos[label]).resize((w, h), Image.BICUBIC), dtype=np.int16)
        texture = np.asarray(
            Image.fromarray(rng.integers(0, 256, size=(h // 4, w // 4, 3), dtype=np.uint8)).resize(
                (w, h), Image.BILINEAR
            ),
            dtype=np.int16,
        )
        img = np.clip(base + (texture - 128) // 3 + rng.integers(-8, 9, size=(h, w, 3)), 0, 255).astype(np.uint8)
        d = root / f"class_{label:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:05d}.jpg", quality=90)
    return root


# --------------------------------------------------------------------------- the two pipelines


def distcls_loader(root: Path, args, batch: int, device: torch.device, gpu_decode: bool = False):
    """distcls's own path: imagefolder builder -> train loader -> Preprocess (as the Trainer calls it)."""
    from distcls import config
    from distcls.data import build_data, train_loader

    cfg = config.load(
        None,
        [
            "data.name=imagefolder", f"data.root={root}", f"data.image_size={args.size}", "data.val_fraction=0",
            "data.split=[0.99, 0, 0.01]", "data.augment.random_resized_crop=true", "data.augment.hflip=true",
            f"data.gpu_decode={str(gpu_decode).lower()}",
        ],
    )
    data = build_data(cfg)
    loader = train_loader(
        data.splits.train, batch, 1, 0, 0, device, args.workers, prefetch_factor=cfg.data.prefetch_factor,
        gpu_decode=gpu_decode,
    )

    def epochs():
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield ((data.preprocess(b.images, b.keys, epoch, train=True), b.labels) for b in loader)
            epoch += 1

    return epochs(), len(loader) * batch


def torchvision_loader(root: Path, args, batch: int, device: torch.device):
    """torchvision's reference recipe (references/classification/presets.py, PIL backend, transforms.v2)."""
    import torchvision
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomResizedCrop(args.size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD), v2.ToPureTensor()])
    ds = torchvision.datasets.ImageFolder(str(root), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)

    def epochs():
        while True:
            yield ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)

    return epochs(), len(loader) * batch


def _time_epoch(epochs, consume=None, max_batches=None) -> tuple[float, int]:
    n, t = 0, time.perf_counter()
    batches = next(epochs)
    for i, (x, y) in enumerate(batches):
        if consume is not None:
            consume(x, y)
        n += len(y)
        if max_batches and i + 1 >= max_batches:
            break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    for _ in batches:  # the rest of the epoch, untimed: no worker is still decoding into the next measurement
        pass
    return n, seconds


def synthetic_batches(batch: int, size: int, classes: int, device: torch.device):
    """One random batch on the device, served an epoch's worth of times: the model's capacity."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)

    def epochs():
        while True:
            yield ((x, y) for _ in range(1000))

    return epochs(), batch * 1000


def pipeline_rates(root: Path, args, device: torch.device, variants: dict) -> dict:
    rates = {name: [] for name in variants}
    loaders = {name: make(root, args, args.batch, device) for name, make in variants.items()}
    for epochs, _ in loaders.values():
        _time_epoch(epochs)  # warm-up: workers start, page cache filled
    for _ in range(args.repeats):
        for name, (epochs, _) in loaders.items():
            n, s = _time_epoch(epochs)
            rates[name].append(n / s)
    return rates


def train_rates(root: Path, args, device: torch.device, variants: dict) -> dict:
    import torchvision

    rates = {name: [] for name in variants}
    loaders = {name: make(root, args, args.train_batch, device) for name, make in variants.items()}
    rates["synthetic"], loaders["synthetic"] = [], synthetic_batches(args.train_batch, args.size, args.classes, device)
    torch.manual_seed(0)
    fmt = torch.channels_last if getattr(args, "channels_last", False) else torch.contiguous_format
    model = getattr(torchvision.models, args.model)(num_classes=args.classes).to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = torch.bfloat16 if getattr(args, "amp", "none") == "bf16" else None

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=fmt)).float(), y)
        loss.backward()
        opt.step()

    # the synthetic input runs as many steps as a loader's epoch
    epoch_steps = loaders["distcls"][1] // args.train_batch
    for epochs, _ in loaders.values():
        _time_epoch(epochs, step, max_batches=2)  # warm-up
    for _ in range(max(1, args.repeats - 1)):
        for name, (epochs, _) in loaders.items():
            n, s = _time_epoch(epochs, step, max_batches=min(args.steps, epoch_steps))
            rates[name].append(n / s)
    return rates


def transfer_rates(root: Path, workdir: Path, args) -> dict:
    """distcls.train images/s with the seed D configs: frozen backbone vs fine-tuning (fp32 on CPU)."""
    import torchvision

    weights = workdir / "resnet18-weights.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    result = {}
    for name, cfg in (("frozen", "flowers_resnet18_transfer.yaml"), ("finetune", "flowers_resnet18_finetune.yaml")):
        out = workdir / f"run_{name}"
        cmd = [
            sys.executable,
            "-m",
            "distcls.train",
            "--config",
            str(repo / "configs" / cfg),
            f"data.root={root}",
            f"model.pretrained={weights}",
            f"run.out_dir={out}",
            "train.epochs=1",
            f"train.max_steps_per_epoch={args.steps + 2}",
            "data.max_eval_samples=32",
            f"data.num_workers={args.workers}",
            "train.amp=none",
            "log.every_steps=0",
            f"data.batch_size={args.train_batch}",
            f"dist.device={args.device}",
        ]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        result[f"{name}_train_images_per_sec"] = round(
            json.loads((out / "summary.json").read_text())["train_images_per_sec"], 1
        )
    result["finetune_over_frozen"] = round(
        result["finetune_train_images_per_sec"] / result["frozen_train_images_per_sec"], 3
    )
    return result


def _summarize(rates: dict, ours: str, theirs: str) -> dict:
    out = {
        name: {"median": round(statistics.median(v), 1), "all": [round(x, 1) for x in v]} for name, v in rates.items()
    }
    out["ratio_distcls_over_torchvision"] = round(statistics.median(rates[ours]) / statistics.median(rates[theirs]), 3)
    if "synthetic" in rates:
        capacity = statistics.median(rates["synthetic"])
        out["ratio_over_synthetic"] = {
            name: round(statistics.median(v) / capacity, 3) for name, v in rates.items() if name != "synthetic"
        }
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    variants = {"distcls": distcls_loader, "torchvision": torchvision_loader}
    if device.type == "cuda":
        variants["distcls_gpu_decode"] = lambda *a: distcls_loader(*a, gpu_decode=True)
    result = {"cpu_count": os.cpu_count(), "device": str(device), "images": args.images, "classes": args.classes,
              "workers": args.workers, "crop": args.size, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="distcls-bench-imagefolder-") as tmp:
        t = time.perf_counter()
        root = Path(args.root) if args.root else write_jpegs(Path(tmp) / "images", args.images, args.classes)
        if args.root:
            result["root"], result["images"] = str(root), sum(1 for _ in root.rglob("*.jpg"))
            result["classes"] = args.classes = sum(1 for d in root.iterdir() if d.is_dir())
        result["generate_s"] = round(time.perf_counter() - t, 1)
        result["jpeg_mb"] = round(sum(p.stat().st_size for p in root.rglob("*.jpg")) / 2 ** 20, 1)
        result["pipeline_images_per_sec"] = _summarize(
            pipeline_rates(root, args, device, variants), "distcls", "torchvision"
        )
        if args.steps:
            result[f"train_{args.model}_images_per_sec"] = _summarize(
                train_rates(root, args, device, variants), "distcls", "torchvision"
            )
            result["train_setup"] = {
                "model": args.model,
                "batch": args.train_batch,
                "amp": args.amp,
                "channels_last": args.channels_last,
            }
        if args.transfer:
            result["transfer_resnet18"] = transfer_rates(root, Path(tmp), args)
    return result

