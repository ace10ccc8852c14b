"""Engine math: gradient accumulation, AMP + clipping, optimizers and schedules."""
import math

import pytest
import torch
import torch.nn as nn

from distcls import config
from distcls.config import AugmentConfig, TrainConfig
from distcls.data import SplitView, TensorSource, train_loader
from distcls.data.transforms.augment import Preprocess
from distcls.engine import Precision, Progress, Trainer, build_optimizer, lr_factor
from conftest import load_ckpt, max_weight_diff, train_in_process


def test_accumulating_2x32_equals_one_batch_of_64(tmp_path):
    common = [
        "data.batch_size=64", "model.name=lenet", "data.image_size=16", "train.epochs=1", "train.max_steps_per_epoch=4",
    ]
    train_in_process(tmp_path / "one", *common, "train.accum_steps=1")
    train_in_process(tmp_path / "accum", *common, "train.accum_steps=2")
    a = load_ckpt(tmp_path / "one/checkpoints/last.pt")
    b = load_ckpt(tmp_path / "accum/checkpoints/last.pt")
    assert a["step"] == b["step"] == 4
    assert max_weight_diff(a["model"], b["model"]) < 1e-6
    train_in_process(tmp_path / "init", *common, "optim.lr=1e-9")  # sanity: training moved the weights
    c = load_ckpt(tmp_path / "init/checkpoints/last.pt")
    assert max_weight_diff(a["model"], c["model"]) > 1e-3


def _tiny_trainer(amp: str, clip, lr=1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    precision = Precision(amp, torch.device("cpu"))  # fp16: GradScaler with torch's initial scale 2**16
    cfg = TrainConfig(amp=amp, clip_grad_norm=clip)
    pre = Preprocess(1, 4, (0.5,), (0.25,), AugmentConfig(), 0)
    src = TensorSource(torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8), torch.arange(64) % 4)
    loader = train_loader(SplitView(src, torch.arange(64)), 32, 1, 0, 0, torch.device("cpu"), max_steps=1)
    return Trainer(model, model, opt, sched, precision, cfg, pre, torch.device("cpu")), loader, model


def train_one_epoch(trainer, loader):
    for _ in trainer.train_epoch(loader, Progress(torch.device("cpu"))):
        pass


def test_clipping_under_fp16_scaler_clips_the_unscaled_gradient():
    trainer, loader, model = _tiny_trainer("fp16", clip=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    train_one_epoch(trainer, loader)
    grad_norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    step_norm = torch.norm(torch.stack([(p.detach() - b).norm() for p, b in zip(model.parameters(), before)])).item()
    # Unscaled then clipped: the gradient norm is the clip value, and SGD(lr=1) moved the weights by it.
    # (Clipping the SCALED gradient would leave a norm of 0.01 / 65536 after unscaling.)
    assert grad_norm == pytest.approx(0.01, rel=1e-3)
    assert step_norm == pytest.approx(0.01, rel=1e-2)
    unclipped, loader2, model2 = _tiny_trainer("none", clip=None)
    train_one_epoch(unclipped, loader2)
    assert torch.norm(torch.stack([p.grad.norm() for p in model2.parameters()])).item() > 0.1


def test_bf16_path_trains(tmp_path):
    s = train_in_process(tmp_path / "bf16", "train.amp=bf16", "train.epochs=4")
    records = [l for l in (tmp_path / "bf16/metrics.jsonl").read_text().splitlines()]
    import json
    train = [json.loads(l) for l in records if json.loads(l)["split"] == "train"]
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    assert s["test_acc"] > 0.8
    ck = load_ckpt(tmp_path / "bf16/checkpoints/last.pt")
    assert all(v.dtype == torch.float32 for v in ck["model"].values() if v.is_floating_point())


def test_fp16_scaler_state_is_checkpointed(tmp_path):
    train_in_process(tmp_path / "fp16", "train.amp=fp16", "train.epochs=1", "train.max_steps_per_epoch=3")
    ck = load_ckpt(tmp_path / "fp16/checkpoints/last.pt")
    assert ck["scaler"]["scale"] > 0


def test_warmup_then_cosine_schedule():
    cfg = config.load(None, ["sched.warmup_epochs=1", "sched.name=cosine"]).sched
    f = [lr_factor(s, cfg, steps_per_epoch=10, total_steps=100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    step = config.load(None, ["sched.name=step", "sched.step_epochs=2", "sched.gamma=0.5"]).sched
    assert [lr_factor(s, step, 10, 100) for s in (0, 19, 20, 45)] == [1.0, 1.0, 0.5, 0.25]


def test_no_weight_decay_on_biases_and_norm_parameters():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    opt = build_optimizer(model, config.load(None, ["optim.name=adamw", "optim.weight_decay=0.1"]).optim)
    decays = {len(g["params"]): g["weight_decay"] for g in opt.param_groups}
    assert decays == {2: 0.1, 4: 0.0}
