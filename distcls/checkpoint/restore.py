"""Rebuild a trained model from a checkpoint (for evaluate and predict)."""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from distcls import config as config_mod
from distcls.checkpoint import ResumePoint, read_checkpoint
from distcls.checkpoint.checkpointer import ModuleWeights, load_components
from distcls.config import Config
from distcls.data import Preprocess
from distcls.errors import ConfigError, UserError
from distcls.models import build_model, torchvision_zoo
from distcls.models.weights import with_pretrained_preprocessing
from distcls.spec import DataSpec


@dataclass
class Restored:
    cfg: Config
    spec: DataSpec
    model: torch.nn.Module
    preprocess: Preprocess
    checkpoint: ResumePoint


def _explicit_keys(overrides: Sequence[str]) -> set:
    return {config_mod.parse_override(o)[0] for o in overrides}


def check_stored_plugins(stored: dict, path, overrides: Sequence[str], sections=("model",)) -> None:
    """A checkpoint must not choose code to import: a plug-in path stored in it ('pkg.module:builder')
    is used only when the user names it on the command line too. `sections`: the builders to be used."""
    from distcls.data import DATASETS
    from distcls.models import MODELS

    explicit = _explicit_keys(overrides)
    for section in sections:
        name = stored[section]["name"]
        if {"model": MODELS, "data": DATASETS}[section].is_import_path(name) and f"{section}.name" not in explicit:
            raise UserError(
                f"checkpoint {path} was trained with the plug-in {section}.name={name}; a checkpoint does not choose "
                f"code to import: add {section}.name={name} to the command line if you trust that module"
            )


class EMAWeights:
    """Loads a checkpoint's `ema` entry ({'weights': state_dict, 'updates': n}) into a plain module."""

    def __init__(self, module: torch.nn.Module):
        self.weights = ModuleWeights(module)

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state["weights"])


def restore(path: str, device: torch.device, overrides: Sequence[str] = (), ema: bool = False) -> Restored:
    """The checkpoint's model in eval mode on `device`: its trained weights, or with `ema` its
    model EMA's (train.ema.enabled)."""
    point = ResumePoint(path, read_checkpoint(path, "--checkpoint", resume=False))
    if ema and not point.state("ema"):
        raise UserError(
            f"checkpoint {path} holds no EMA weights (it was trained without train.ema.enabled=true); leave out --ema"
        )
    if ema and not point.state("ema").get("updates"):
        raise UserError(f"checkpoint {path}: its model EMA never updated (saved before its first update, every "
                        f"train.ema.every_steps steps): it holds the initial weights; leave out --ema")
    base = copy.deepcopy(point.config)
    check_stored_plugins(base, path, overrides)
    trained_from = base["model"].get("pretrained")  # torchvision weights: their preprocessing was the run's
    name = base["model"].get("name") or ""
    # and the builder arguments they came with (googlenet's transform_input)
    if name.startswith(torchvision_zoo.PREFIX):
        base["model"]["args"] = {**torchvision_zoo.weights_args(name[len(torchvision_zoo.PREFIX):], trained_from),
                                 **(base["model"].get("args") or {})}
    base["model"]["pretrained"] = None  # the checkpoint's own weights replace any starting point
    # a checkpoint written before the key: its meaning (run.checks.SAVED_BEFORE_THE_KEY)
    if "carve_val" not in base.get("data", {}):
        base.setdefault("data", {})["carve_val"] = True
    if base.get("data", {}).get("image_size") is None:  # e.g. taken from torchvision weights' preprocessing
        base.setdefault("data", {})["image_size"] = point.data_spec["image_size"]
    saved = config_mod.from_dict(copy.deepcopy(point.config)) if "freeze" in base["model"] else None
    frozen = saved.model.frozen if saved is not None else bool(base["model"].get("freeze_backbone"))
    base["model"]["freeze"], base["model"]["freeze_backbone"] = "none", None
    try:
        cfg = config_mod.load(None, overrides, base=base)
    except ConfigError as exc:
        raise UserError(f"checkpoint {path}: its stored config with your overrides is invalid: {exc}") from None
    try:
        # e.g. eval_resize 232 of V2 weights, as the run evaluated
        cfg = with_pretrained_preprocessing(cfg, trained_from or "")
    except UserError:  # weights this torchvision no longer names: the stored config's sizes as they are
        pass
    spec = DataSpec.from_dict(point.data_spec)
    model = build_model(cfg.model, spec)
    if frozen:
        from distcls.models.transfer import freeze_backbone
        model = freeze_backbone(model)  # same module types (FrozenBatchNorm2d) as when it was saved
    # as a resume restores it
    load_components(point, {"ema": EMAWeights(model)} if ema else {"model": ModuleWeights(model)})
    model.to(device).eval()
    # no training: no per-epoch draw table
    pre = Preprocess.from_spec(spec, cfg.data.augment, cfg.run.seed, interpolation=cfg.data.interpolation)
    return Restored(cfg, spec, model, pre, point)


@torch.no_grad()
def measure_speed(model: torch.nn.Module, preprocess: Preprocess, images: torch.Tensor, batch_size: int,
                  min_seconds: float = 1.0, latency_runs: int = 50) -> dict:
    """Inference speed on `images`' device (uint8 [N, C, H, W] already there): preprocessing + forward.

    throughput: images/s at `batch_size` (the eval batch; images repeated to fill it), timed over
    at least `min_seconds` after 2 warm-up batches. latency: one image at a time, `latency_runs`
    runs after 5 warm-ups, median and 95th percentile in milliseconds. Each timed call ends with a
    device synchronization, so the numbers are wall-clock, not queued kernel launches.
    """
    device = images.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    batch = images.repeat(-(-batch_size // len(images)), 1, 1, 1)[:batch_size]
    keys = torch.arange(batch_size)

    def forward(x, k):
        return model(preprocess(x, k, 0, train=False))

    for _ in range(2):
        forward(batch, keys)
    sync()
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < min_seconds:
        forward(batch, keys)
        sync()
        runs += 1
    throughput = runs * batch_size / (time.perf_counter() - start)
    one, key = images[:1], keys[:1]
    for _ in range(5):
        forward(one, key)
    sync()
    times = []
    for _ in range(latency_runs):
        t0 = time.perf_counter()
        forward(one, key)
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    model.train(was_training)
    times.sort()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return {
        "device": f"{device} ({name})",
        "batch_size": batch_size,
        "images_per_sec": throughput,
        "latency_ms_batch1": {
            "median": statistics.median(times),
            "p95": times[min(len(times) - 1, int(0.95 * len(times)))],
            "runs": latency_runs,
        },
    }
