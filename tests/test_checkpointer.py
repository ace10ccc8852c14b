"""The checkpointer's seams, in process: the save policy, the files it leaves, and a symmetric
save/load of every stateful component (model, optimizer, scheduler, precision, RNG, progress)."""
import os

import pytest
import torch
import torch.nn as nn

from distcls.checkpoint import CheckpointFiles, Checkpointer, GlobalRNG, SaveReason, read_checkpoint
from distcls.checkpoint.checkpointer import ModuleWeights, OptimizerState, SavePolicy
from distcls.config import AugmentConfig, TrainConfig
from distcls.data import SplitView, TensorSource, train_loader
from distcls.data.transforms.augment import Preprocess
from distcls.engine import Precision, Progress, Trainer, build_optimizer, build_scheduler
from distcls.errors import UserError
from distcls import config

CPU = torch.device("cpu")


def progress_at(epoch, epoch_step, global_step) -> Progress:
    p = Progress(CPU, steps_per_epoch=10)
    p.epoch, p.epoch_step, p.global_step = epoch, epoch_step, global_step
    return p


POLICY = SavePolicy(every_steps=4, every_epochs=2, epochs=5, has_val=True)


@pytest.mark.parametrize("epoch, epoch_step, step, reason, new_best, expected", [
    (0, 4, 4, SaveReason.STEP, False, (False, False)),  # every 4 steps: last.pt only
    (0, 5, 5, SaveReason.STEP, False, None),
    (0, 10, 10, SaveReason.STEP, False, None),  # the epoch's last step: the epoch end saves it
    (0, 7, 7, SaveReason.STOP, False, (False, False)),  # a stop mid-epoch always saves
    (1, 0, 10, SaveReason.EPOCH_END, False, None),  # epoch 1 done: not periodic, not best
    (1, 0, 10, SaveReason.EPOCH_END, True, (False, True)),  # a new best: best.pt
    (2, 0, 20, SaveReason.EPOCH_END, False, (True, False)),  # every 2 epochs: epoch_0002.pt
    (3, 0, 30, SaveReason.STOP, False, (False, False)),  # a stop at an epoch end saves anyway
    (5, 0, 50, SaveReason.EPOCH_END, False, (True, False)),  # final: epoch file too
    (5, 0, 50, SaveReason.STEP, False, None),
])
def test_save_policy(epoch, epoch_step, step, reason, new_best, expected):
    assert POLICY.decide(progress_at(epoch, epoch_step, step), reason, new_best) == expected


def test_every_steps_whose_step_ends_an_epoch_is_saved_at_the_epoch_end():
    """checkpoint.every_steps=10 with 10 steps per epoch and every_epochs=0: the due step is the
    epoch's last, which the mid-epoch rule leaves to the epoch end; the epoch end must save it."""
    policy = SavePolicy(every_steps=10, every_epochs=0, epochs=5, has_val=True)
    assert policy.decide(progress_at(0, 10, 10), SaveReason.STEP) is None
    assert policy.decide(progress_at(1, 0, 10), SaveReason.EPOCH_END) == (False, False)
    assert policy.decide(progress_at(1, 0, 10), SaveReason.EPOCH_END, new_best=True) == (False, True)
    assert SavePolicy(15, 0, 5, True).decide(progress_at(1, 0, 10), SaveReason.EPOCH_END) is None


def test_without_validation_the_final_save_is_the_best_file():
    policy = SavePolicy(every_steps=0, every_epochs=0, epochs=3, has_val=False)
    assert policy.decide(progress_at(3, 0, 30), SaveReason.EPOCH_END) == (False, True)
    assert policy.decide(progress_at(2, 0, 20), SaveReason.EPOCH_END) is None
    assert policy.decide(progress_at(0, 4, 4), SaveReason.STEP) is None  # every_steps=0: no mid-epoch saves


def _state(epoch: int, value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "epoch": epoch, "step": epoch * 10}


def test_retention_keeps_the_newest_epoch_files_and_links_share_the_bytes(tmp_path):
    files = CheckpointFiles(tmp_path, keep=2, warn=lambda m: None)
    for epoch in range(1, 6):
        files.write(_state(epoch, float(epoch)), epoch_file=True, best_file=epoch == 3)
    assert sorted(p.name for p in files.dir.glob("epoch_*.pt")) == ["epoch_0004.pt", "epoch_0005.pt"]
    assert os.stat(files.last).st_ino == os.stat(files.dir / "epoch_0005.pt").st_ino  # one write, two names
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    assert load(files.best)["epoch"] == 3 and torch.equal(load(files.best)["model"]["w"], torch.full((3,), 3.0))
    assert load(files.dir / "epoch_0004.pt")["epoch"] == 4  # later saves replaced last.pt's entry, not this inode
    assert not list(files.dir.glob(".*.tmp"))


def test_keep_zero_writes_no_epoch_files_and_nonfinite_weights_are_never_written(tmp_path):
    warnings = []
    files = CheckpointFiles(tmp_path, keep=0, warn=warnings.append)
    files.write(_state(1, 1.0), epoch_file=True, best_file=False)
    assert [p.name for p in files.dir.iterdir()] == ["last.pt"]
    assert files.write(_state(2, float("nan")), epoch_file=True, best_file=True) is None
    assert torch.load(files.last, weights_only=True)["epoch"] == 1 and not files.best.exists()
    assert "NaN/Inf" in warnings[0]


# ----------------------------------------------------------------------------- symmetric save / load

def _parts(tmp_path, amp="fp16", optim="sgd"):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    cfg = config.load(None, [f"optim.name={optim}", "optim.lr=0.1", "sched.name=cosine", "sched.warmup_epochs=1"])
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.optim, steps_per_epoch=4, epochs=3)
    precision = Precision(amp, CPU)
    progress = Progress(CPU, steps_per_epoch=4)
    src = TensorSource(torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8), torch.arange(64) % 4)
    loader = train_loader(SplitView(src, torch.arange(64)), 16, 1, 0, 0, CPU)
    pre = Preprocess(1, 4, (0.5,), (0.25,), AugmentConfig(), 0)
    trainer = Trainer(module, module, optimizer, scheduler, precision, TrainConfig(amp=amp), pre, CPU)
    checkpointer = Checkpointer(
        CheckpointFiles(tmp_path, keep=1),
        {
            "model": ModuleWeights(module),
            "optimizer": OptimizerState(optimizer),
            "scheduler": scheduler,
            "scaler": precision,
            "rng": GlobalRNG(),
        },
        progress,
        SavePolicy(0, 1, 3, False),
        {"config": cfg.to_dict(), "data_spec": {"channels": 1, "num_classes": 4, "image_size": 4}, "world_size": 1},
        True,
    )
    return trainer, loader, progress, checkpointer


def _steps(trainer, loader, progress, n):
    for i, _ in enumerate(trainer.train_epoch(loader, progress)):
        if i + 1 == n:
            return


@pytest.mark.parametrize("amp, optim", [("fp16", "sgd"), ("none", "adamw")])
def test_save_then_load_restores_every_component_and_training_continues_identically(tmp_path, amp, optim):
    trainer, loader, progress, checkpointer = _parts(tmp_path / "a", amp, optim)
    _steps(trainer, loader, progress, 3)  # mid-epoch
    path = checkpointer.save()
    saved = read_checkpoint(path)
    assert (
        saved["epoch"] == 0
        and saved["epoch_step"] == 3
        and saved["step"] == 3
        and saved["progress"]["epoch_totals"]["count"] == 48
    )

    fresh_trainer, _, fresh_progress, fresh = _parts(tmp_path / "b", amp, optim)
    from distcls.checkpoint import ResumePoint
    fresh.load(ResumePoint(path, {**saved, "optimizer": {**saved["optimizer"], "param_groups": [
        # as saved by a distcls without fused kernels
        {**g, "fused": None} for g in saved["optimizer"]["param_groups"]]}}))
    again = fresh.state_dict()
    # progress: skipped_steps, the running sums, ...
    for key in ("epoch", "epoch_step", "step", "best_metric", "progress", "scaler"):
        assert again[key] == saved[key], key
    assert all(torch.equal(again["model"][k], saved["model"][k]) for k in saved["model"])
    assert again["scheduler"] == saved["scheduler"]
    # the implementation stays as this run built it
    assert all(g["fused"] for g in fresh_trainer.optimizer.param_groups)

    _steps(trainer, loader, progress, 1)  # the 4th step, in both
    _steps(fresh_trainer, loader, fresh_progress, 1)
    a, b = trainer.module.state_dict(), fresh_trainer.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert progress.agree_sums() == fresh_progress.agree_sums()


def test_a_state_that_does_not_fit_names_the_component(tmp_path):
    trainer, loader, progress, checkpointer = _parts(tmp_path / "a", "none", "sgd")
    _steps(trainer, loader, progress, 1)
    saved = read_checkpoint(checkpointer.save())
    saved["optimizer"]["param_groups"] = saved["optimizer"]["param_groups"][:1]
    _, _, _, fresh = _parts(tmp_path / "b", "none", "sgd")
    from distcls.checkpoint import ResumePoint
    with pytest.raises(UserError, match="its 'optimizer' state does not fit this run"):
        fresh.load(ResumePoint(tmp_path / "x.pt", saved))
    saved = read_checkpoint(checkpointer.files.last)
    saved["model"]["1.weight"] = torch.zeros(9, 16)
    with pytest.raises(UserError, match="does not fit the model: 1 tensors differ in shape"):
        fresh.load(ResumePoint(tmp_path / "x.pt", saved))


def test_an_optimizer_state_saved_without_fused_kernels_is_placed_as_the_fused_optimizer_keeps_it():
    """torch places a loaded `step` by the SAVED groups' flags. Saved without fused kernels (by a
    distcls before Engine v2) it would stay as saved: on a GPU a CPU tensor, which CUDA's fused
    Adam refuses at the first step after the resume. On the CPU the placement shows in the dtype:
    the fused policy makes every `step` float32 on the parameter's device."""
    model = nn.Linear(4, 2)
    # build_optimizer's groups, not fused
    old = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    old.step()
    saved = old.state_dict()
    assert not any(g.get("fused") for g in saved["param_groups"])
    for s in saved["state"].values():
        s["step"] = s["step"].double()  # a placement the fused policy would change
    fused = build_optimizer(model, config.load(None, ["optim.name=adam"]).optim)
    OptimizerState(fused).load_state_dict(saved)
    assert all(g["fused"] for g in fused.param_groups)
    steps = [fused.state[p]["step"] for p in model.parameters()]
    assert all(
        s.dtype == torch.float32 and s.device == p.device and float(s) == 1.0 for s, p in zip(steps, model.parameters())
    )
