"""distcls's training step beside a hand-written loop, the tutorial DataLoader pipeline and the FLOP ceiling.

One process, one config (`--config F key=value ...`), four figures of training images/s:
  a  distcls: the real engine, built as a run builds it (components.build_components: loader, model,
     optimizer, precision, Trainer.train_epoch)
  b  a minimal hand-written loop on the same in-memory batches: same model, optimizer, AMP,
     clipping and augmentation (batched, on the device), no engine
  c  the tutorial pipeline: per-sample PIL images -> torchvision transforms.v2 (same augmentation,
     normalization) -> DataLoader(shuffle, --workers) -> the same hand-written step
  d  the ceiling: forward+backward FLOPs per image (torch.utils.flop_counter) against this
     machine's measured matmul peak for the training dtype
a, b and c start from the same initial weights. Each round runs a, b and c (order rotated every
round, so drift of a shared machine hits all alike); every run excludes its warm-up steps. The
headline a/b and a/c are medians of the per-round ratios (runs seconds apart); a/d uses a's
median. The load average before and after is recorded: on a shared machine, repeat and compare.
"""
from __future__ import annotations

import copy
import os
import statistics
import time

from distcls.bench.common import machine
from distcls.errors import UserError

VARIANTS = {"a": "distcls (engine)", "b": "hand-written loop", "c": "DataLoader + transforms.v2", "d": "FLOP ceiling"}


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the built-in default config)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (default 20)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps before each timed run (default 2, at least 1)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of a, b, c (default 5)")
    parser.add_argument(
        "--workers", type=int, default=2,
        help="DataLoader workers of the tutorial pipeline c (default 2, as the CIFAR-10 tutorial)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's own choice, one per core)"
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also record a torch.profiler summary of N steps of a and of b (the evidence for a gap)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value",
        help="config overrides, e.g. model.name=lenet data.batch_size=128",
    )


def _check(args, cfg, env, data) -> None:
    if min(args.steps, args.warmup, args.rounds) < 1 or args.workers < 0:
        raise UserError("--steps, --warmup and --rounds must be at least 1 and --workers at least 0")
    if env.distributed:
        raise UserError("compare runs in one process; for world sizes use `python -m distcls.bench scaling`")
    if cfg.train.accum_steps != 1:
        raise UserError("compare measures train.accum_steps=1 (the hand-written loop has no accumulation)")
    view = data.splits.train
    if view.source.decoded_on_demand:
        raise UserError(
            "compare needs an in-memory dataset (digits, mnist, fashion_mnist, cifar10, cifar100, synthetic), not "
            f"data.name={cfg.data.name}"
        )
    spec = data.spec
    if tuple(view.source.images.shape[1:]) != (spec.channels, spec.image_size, spec.image_size):
        raise UserError("compare measures images at their own size and channels; drop data.image_size / data.channels")
    if len(view) < cfg.data.batch_size:
        raise UserError(f"the training split has {len(view)} samples, fewer than data.batch_size={cfg.data.batch_size}")


class EngineRun:
    """a: distcls's own Trainer.train_epoch on distcls's own loader: the components a run trains
    with (components.build_components, as runner.TrainingRun builds them)."""

    def __init__(self, cfg, env, parts):
        self.trainer, self.loader, self.progress = parts.trainer, parts.train, parts.progress
        self.batch, self.device = cfg.data.batch_size, env.device

    def run(self, warmup: int, steps: int) -> float:
        from distcls.bench.handwritten import sync

        done, t0 = 0, None
        while True:
            for _ in self.trainer.train_epoch(self.loader, self.progress):
                done += 1
                if done == warmup:
                    sync(self.device)
                    t0 = time.perf_counter()
                if done == warmup + steps:
                    sync(self.device)
                    return steps * self.batch / (time.perf_counter() - t0)
            self.progress.finish_epoch()


class HandRun:
    """b: the hand-written loop on the same uint8 tensors distcls keeps in memory."""

    def __init__(self, cfg, env, data, model):
        from distcls.bench.handwritten import HandLoop

        view = data.splits.train
        self.images = view.source.images[view.indices].to(env.device)
        self.labels = view.source.labels[view.indices].to(env.device)
        self.loop = HandLoop(model, cfg, env.device, data.spec.mean, data.spec.std)
        self.batch, self.device = cfg.data.batch_size, env.device

    def batches(self):
        import torch

        n, b = len(self.labels), self.batch
        while True:
            perm = torch.randperm(n, device=self.device)
            for i in range(n // b):
                idx = perm[i * b:(i + 1) * b]
                yield self.loop.preprocess(self.images[idx]), self.labels[idx]

    def run(self, warmup: int, steps: int) -> float:
        from distcls.bench.handwritten import timed_steps

        return timed_steps(self.batches(), self.loop.step, warmup, steps, self.device)


def tutorial_transform(spec, augment):
    """The per-sample pipeline the tutorials write, in transforms.v2 (PIL in, normalized tensor out)."""
    import torch
    from torchvision.transforms import v2

    ops = []
    if augment.crop_padding:
        ops.append(v2.RandomCrop(spec.image_size, padding=augment.crop_padding))
    if augment.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if augment.rotation_deg:
        ops.append(v2.RandomRotation(augment.rotation_deg))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    return v2.Compose(ops)


class TutorialDataset:
    """Like torchvision.datasets.CIFAR10: uint8 HWC arrays in memory, one PIL image per __getitem__."""

    def __init__(self, images_nchw, labels, transform):
        self.images = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        if self.images.shape[-1] == 1:
            self.images = self.images[..., 0]
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


class TutorialRun:
    """c: DataLoader(shuffle=True, num_workers, pin_memory on GPU, drop_last) feeding the hand-written step."""

    def __init__(self, cfg, env, data, model, workers: int):
        import torch

        from distcls.bench.handwritten import HandLoop

        view = data.splits.train
        ds = TutorialDataset(view.source.images[view.indices], view.source.labels[view.indices],
                             tutorial_transform(data.spec, cfg.data.augment))
        self.loader = torch.utils.data.DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=True, num_workers=workers,
                                                  pin_memory=env.device.type == "cuda", drop_last=True)
        self.loop = HandLoop(model, cfg, env.device, data.spec.mean, data.spec.std)
        self.device = env.device

    def batches(self):
        while True:
            for x, y in self.loader:  # a new iterator (and worker start) every epoch, as in the tutorials
                yield (x.to(self.device, non_blocking=True).contiguous(memory_format=self.loop.memory_format),
                       y.to(self.device, non_blocking=True))

    def run(self, warmup: int, steps: int) -> float:
        from distcls.bench.handwritten import timed_steps

        batches = self.batches()
        try:
            return timed_steps(batches, self.loop.step, warmup, steps, self.device)
        finally:
            batches.close()  # its workers stop here, not during the next run


def flops_per_image(model, cfg, spec, device, batch: int) -> float:
    """Forward + backward FLOPs of one training image (matmuls and convolutions, as FlopCounterMode counts)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from distcls.bench.handwritten import AMP_DTYPES

    m = copy.deepcopy(model).train()
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    x = torch.randn(batch, spec.channels, spec.image_size, spec.image_size, device=device).contiguous(memory_format=fmt)
    dtype = AMP_DTYPES[cfg.train.amp]
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = m(x).float().logsumexp(1).mean()
        loss.backward()
    return counter.get_total_flops() / batch


def matmul_peak(device, amp: str) -> dict:
    """Best measured FLOP/s of a square matmul in the training dtype (bf16/fp16 under AMP, else fp32)."""
    import torch

    from distcls.bench.handwritten import AMP_DTYPES, sync

    dtype = AMP_DTYPES[amp] or torch.float32
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - t) / 3)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n ** 3 / best}


# Ops and CUDA runtime calls that make the host wait for the device (a `.item()`, `.tolist()` of a
# device tensor, `nonzero`, a blocking copy, an explicit synchronize).
HOST_SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize",
                    "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def host_syncs(events) -> dict:
    """{event name: count} of HOST_SYNC_EVENTS among torch.profiler's function events."""
    counts = {}
    for e in events:
        if e.name in HOST_SYNC_EVENTS:
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def _profile(run, steps: int) -> dict:
    """torch.profiler over `steps` steps of one run, after one warm-up step: the op table (sorted
    by self time) and the host-sync calls counted (the run's own timing adds one synchronize at
    each end on CUDA)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run.run(1, steps)
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return {
        "steps": steps,
        "host_syncs": host_syncs(prof.events()),
        "table": prof.key_averages().table(sort_by=sort, row_limit=15),
    }


def _median(xs):
    return statistics.median(xs) if xs else None


def run(args) -> dict:
    import torch

    from distcls import config as config_mod
    from distcls.runtime import dist
    from distcls.run.components import build_components

    cfg = config_mod.load(args.config, [*args.overrides, "log.every_steps=0"])
    if args.threads:
        torch.set_num_threads(args.threads)
    env = dist.detect(cfg.dist.device, cfg.dist.backend)
    parts = build_components(cfg, env)  # sets the device's switches (engine/backends.py) as a run does
    data, spec, switches = parts.data, parts.data.spec, parts.switches
    _check(args, cfg, env, data)
    initial = copy.deepcopy(parts.module)  # b and c start from the same weights as a

    def fresh_model():
        m = copy.deepcopy(initial)
        return torch.compile(m) if cfg.train.compile else m

    runs = {"a": EngineRun(cfg, env, parts), "b": HandRun(cfg, env, data, fresh_model()),
            "c": TutorialRun(cfg, env, data, fresh_model(), args.workers)}
    flops = flops_per_image(initial, cfg, spec, env.device, min(cfg.data.batch_size, 16))

    load_before = os.getloadavg()
    images_per_sec = {k: [] for k in runs}
    peaks = []
    order = list(runs)
    for r in range(args.rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            images_per_sec[k].append(runs[k].run(args.warmup, args.steps))
        peaks.append(matmul_peak(env.device, cfg.train.amp))
    peak = max(peaks, key=lambda p: p["flops_per_s"])
    median = {k: _median(v) for k, v in images_per_sec.items()}
    per_round = {f"a/{k}": [x / y for x, y in zip(images_per_sec["a"], images_per_sec[k])] for k in ("b", "c")}
    median["d"] = peak["flops_per_s"] / flops if flops else None

    result = {
        "mode": "compare",
        "machine": machine(),
        "setup": {
            "config": args.config,
            "overrides": list(args.overrides),
            "device": str(env.device),
            "model": cfg.model.name,
            "cifar_stem": cfg.model.cifar_stem,
            "data": cfg.data.name,
            "image": [spec.channels, spec.image_size, spec.image_size],
            "train_samples": len(data.splits.train),
            "batch_size": cfg.data.batch_size,
            "optimizer": cfg.optim.name,
            "amp": cfg.train.amp,
            "channels_last": cfg.train.channels_last,
            "compile": cfg.train.compile,
            "backends": switches,
            "clip_grad_norm": cfg.train.clip_grad_norm,
            "augment": {
                "crop_padding": cfg.data.augment.crop_padding,
                "hflip": cfg.data.augment.hflip,
                "rotation_deg": cfg.data.augment.rotation_deg,
            },
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "rounds": args.rounds,
            "dataloader_workers": args.workers,
            "torch_threads": torch.get_num_threads(),
        },
        "variants": VARIANTS,
        "images_per_sec": {k: [round(x, 1) for x in v] for k, v in images_per_sec.items()},
        "median_images_per_sec": {k: round(v, 1) if v is not None else None for k, v in median.items()},
        "flops_per_image": flops,
        "matmul_peak": {**peak, "all_rounds_flops_per_s": [p["flops_per_s"] for p in peaks]},
        "ratios": {
            "a/b": round(_median(per_round["a/b"]), 3),
            "a/c": round(_median(per_round["a/c"]), 3),
            "a/d": round(median["a"] / median["d"], 4) if median["d"] else None,
        },
        "per_round_ratios": {k: [round(x, 3) for x in v] for k, v in per_round.items()},
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    if parts.ema is not None:  # train.ema.enabled: a includes the EMA updates; their own cost, measured here
        result["ema"] = _ema_cost(parts, cfg, median["a"])
    if args.profile:
        result["profile"] = {"a": _profile(runs["a"], args.profile), "b": _profile(runs["b"], args.profile)}
    return result


def _ema_cost(parts, cfg, images_per_sec: float, updates: int = 50) -> dict:
    """The model EMA's update (train.ema) timed alone, as a fraction of a's step: per update, and
    per step at train.ema.every_steps (a's figure already includes the updates at that interval)."""
    from distcls.bench.handwritten import sync

    device = next(parts.module.parameters()).device
    for _ in range(3):
        parts.ema.update(parts.module)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(updates):
        parts.ema.update(parts.module)
    sync(device)
    update_s = (time.perf_counter() - t0) / updates
    step_s = cfg.data.batch_size / images_per_sec
    every = cfg.train.ema.every_steps
    return {
        "update_ms": round(update_s * 1e3, 4),
        "step_ms": round(step_s * 1e3, 3),
        "every_steps": every,
        "update_over_step": round(update_s / step_s, 4),
        "per_step_at_every_steps": round(update_s / every / step_s, 5),
    }


def _backends_note(switches) -> str:
    if not switches:
        return ""
    tf32 = switches["tf32"]
    return (
        f", cudnn.benchmark {'on' if switches['cudnn_benchmark'] else 'off'}, TF32 matmul "
        f"{'on' if tf32['matmul'] else 'off'} / conv {'on' if tf32['conv'] else 'off'}"
    )


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["setup"]
    aug = ", ".join(f"{k}={v}" for k, v in s["augment"].items() if v) or "none"
    title = (
        f"{s['model']}{' (CIFAR stem)' if s['cifar_stem'] else ''} on {s['data']} {'x'.join(map(str, s['image']))}, "
        f"batch {s['batch_size']}, "
        f"{s['optimizer']}, amp "
        f"{s['amp']}{', channels_last' if s['channels_last'] else ''}{', compile' if s['compile'] else ''}"
        f"{_backends_note(s.get('backends'))}, augment {aug}, {s['device']} "
        f"({s['torch_threads']} threads); {s['rounds']} rounds x {s['timed_steps']} steps after {s['warmup_steps']} "
        "warm-up"
    )
    table = Table(title=title, title_justify="left")
    for col in ("", "run", "images/s (median)", "per round", "a / run"):
        table.add_column(col, justify="right" if col not in ("", "run") else "left")
    med = result["median_images_per_sec"]
    for k, name in result["variants"].items():
        rounds = result["images_per_sec"].get(k)
        if k == "c":
            name = f"{name}, {s['dataloader_workers']} workers"
        if k == "d":
            p = result["matmul_peak"]
            name = (
                f"{name}: {result['flops_per_image'] / 1e6:.1f} MFLOP/image at {p['flops_per_s'] / 1e9:.1f} GFLOP/s "
                f"({p['dtype']} matmul)"
            )
        ratio = result["ratios"].get(f"a/{k}")
        table.add_row(
            k,
            name,
            f"{med[k]:,.0f}" if med[k] else "-",
            " ".join(f"{x:,.0f}" for x in rounds) if rounds else "-",
            "1.000" if k == "a" else (f"{ratio:.3f}" if ratio is not None else "-"),
        )
    console = Console() if Console().is_terminal else Console(width=150)
    console.print(table)
    r = result["ratios"]
    load = result["load_average_1min"]
    console.print(
        f"a/b {r['a/b']}   a/c {r['a/c']}   a/d {r['a/d']}   (medians of per-round ratios: a/b "
        f"{result['per_round_ratios']['a/b']}, "
        f"a/c {result['per_round_ratios']['a/c']}; load average {load['before']} -> {load['after']})"
    )
    if "ema" in result:
        e = result["ema"]
        console.print(
            f"model EMA: {e['update_ms']:.3f} ms per update = {e['update_over_step']:.2%} of a's {e['step_ms']:.1f} ms "
            f"step; every {e['every_steps']} steps: {e['per_step_at_every_steps']:.3%} per step"
        )
    for k, prof in result.get("profile", {}).items():
        console.print(f"\ntorch.profiler, run {k} ({result['variants'][k]}), {prof['steps']} steps; host-sync calls: "
                      f"{prof['host_syncs'] or 'none'}\n{prof['table']}", markup=False, highlight=False)
