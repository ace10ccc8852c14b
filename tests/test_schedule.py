"""The learning-rate schedule as training builds and drives it: build_optimizer + build_scheduler,
one scheduler.step() after every optimizer step, the lr read from optimizer.param_groups."""
import io
import math

import pytest
import torch
from torch import nn

from distcls import config
from distcls.engine import build_optimizer, build_scheduler
from distcls.errors import ConfigError

SPE = 10  # optimizer steps per epoch


def _model():
    # A backbone (conv) and an nn.Linear classifier head, each with a weight (decayed) and a bias (not).
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))


def _build(overrides, epochs, spe=SPE):
    cfg = config.load(None, list(overrides))
    optimizer = build_optimizer(_model(), cfg.optim)
    return cfg, optimizer, build_scheduler(optimizer, cfg.sched, cfg.optim, spe, epochs)


def _drive(optimizer, scheduler, steps):
    """Per step, the lr of every param group that optimizer step used; then the lrs after the last step."""
    used = []
    for _ in range(steps):
        used.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return used, [g["lr"] for g in optimizer.param_groups]


def _lrs(overrides, epochs, spe=SPE):
    cfg, optimizer, scheduler = _build(overrides, epochs, spe)
    used, after = _drive(optimizer, scheduler, spe * epochs)
    return cfg, [u[0] for u in used], after[0]


def test_warmup_rises_linearly_from_lr_over_warmup_steps_to_lr():
    _, used, _ = _lrs(["optim.lr=0.1", "sched.name=constant", "sched.warmup_epochs=1.5"], epochs=3)
    warmup = 15
    assert used[:warmup] == pytest.approx([0.1 * (k + 1) / warmup for k in range(warmup)], rel=1e-12)
    assert used[0] == pytest.approx(0.1 / warmup, rel=1e-12) and used[warmup - 1] == pytest.approx(0.1, rel=1e-12)
    assert used[warmup:] == pytest.approx([0.1] * (3 * SPE - warmup), rel=1e-12)


def test_no_warmup_starts_at_the_peak_lr():
    _, used, _ = _lrs(["optim.lr=0.1", "sched.name=constant"], epochs=2)
    assert used == [0.1] * 2 * SPE


@pytest.mark.parametrize("warmup_epochs", [0, 1])
@pytest.mark.parametrize("min_lr", [0.0, 0.002])
def test_cosine_decays_from_lr_to_exactly_min_lr_at_the_end_of_training(warmup_epochs, min_lr):
    lr, epochs = 0.1, 5
    _, used, after = _lrs([f"optim.lr={lr}", "sched.name=cosine", f"sched.warmup_epochs={warmup_epochs}",
                           f"sched.min_lr={min_lr}"], epochs)
    warmup, total = warmup_epochs * SPE, epochs * SPE
    cosine = used[warmup:]
    expected = [
        min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * k / (total - warmup))) for k in range(total - warmup)
    ]
    assert cosine == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert cosine[0] == pytest.approx(lr, rel=1e-12)  # the warmup ends at the peak, unchanged by the floor
    assert all(a > b for a, b in zip(cosine, cosine[1:]))
    assert min(cosine) > min_lr  # every optimizer step trains at more than the floor ...
    assert after == pytest.approx(min_lr, rel=1e-12, abs=1e-15)  # ... and the lr training ends at is the floor
    if warmup:
        assert used[:warmup] == pytest.approx([lr * (k + 1) / warmup for k in range(warmup)], rel=1e-12)


def test_cosine_floor_is_the_end_lr_however_long_the_run():
    for epochs, spe in ((1, 1), (1, 7), (3, 4), (40, 13)):
        _, used, after = _lrs(["optim.lr=0.05", "sched.name=cosine", "sched.min_lr=0.001"], epochs, spe)
        assert used[0] == pytest.approx(0.05, rel=1e-12)
        assert after == pytest.approx(0.001, rel=1e-12)
        assert all(0.001 < u <= 0.05 for u in used)


def test_min_lr_above_the_peak_lr_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sched\.min_lr=0\.2 is above optim\.lr=0\.1"):
        config.check_schedule(config.load(None, ["optim.lr=0.1", "sched.min_lr=0.2"]))
    # equal: a constant schedule, allowed
    config.check_schedule(config.load(None, ["optim.lr=0.1", "sched.min_lr=0.1"]))
    # min_lr is the cosine's only
    config.check_schedule(config.load(None, ["optim.lr=0.1", "sched.min_lr=0.2", "sched.name=step"]))


def test_min_lr_above_the_peak_lr_stops_training_but_not_evaluating_an_older_checkpoint(tmp_path, capsys):
    """Training before this check accepted it: such a checkpoint must still evaluate."""
    from conftest import train_in_process
    from distcls import evaluate, train
    from distcls.cli import run_cli

    train_in_process(tmp_path / "run", "train.epochs=1", "train.max_steps_per_epoch=1")
    path = tmp_path / "run/checkpoints/last.pt"
    ck = torch.load(path, weights_only=True)
    ck["config"]["sched"]["min_lr"] = ck["config"]["optim"]["lr"] * 2  # as written by a distcls without the check
    torch.save(ck, path)
    assert run_cli(evaluate.main, ["--checkpoint", str(path)]) == 0
    capsys.readouterr()
    code = run_cli(train.main, [f"run.out_dir={tmp_path / 'new'}", "optim.lr=0.1", "sched.min_lr=0.2"])
    err = capsys.readouterr().err
    assert code == 2 and "sched.min_lr=0.2 is above optim.lr=0.1" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_step_schedule_multiplies_by_gamma_every_step_epochs_counting_warmup():
    lr, epochs = 0.1, 7
    _, used, after = _lrs([f"optim.lr={lr}", "sched.name=step", "sched.step_epochs=2", "sched.gamma=0.5",
                           "sched.warmup_epochs=1", "sched.min_lr=0.05"], epochs)  # min_lr: cosine only, ignored
    assert used[:SPE] == pytest.approx([lr * (k + 1) / SPE for k in range(SPE)], rel=1e-12)
    assert used[SPE:] == pytest.approx([lr * 0.5 ** (k // (2 * SPE)) for k in range(SPE, epochs * SPE)], rel=1e-12)
    assert [used[k] for k in (19, 20, 39, 40, 60)] == pytest.approx([lr, lr / 2, lr / 2, lr / 4, lr / 8], rel=1e-12)
    assert after == pytest.approx(lr / 8, rel=1e-12)


def test_constant_schedule_ignores_min_lr():
    _, used, after = _lrs(["optim.lr=0.1", "sched.name=constant", "sched.min_lr=0.05"], epochs=2)
    assert used == [0.1] * 2 * SPE and after == 0.1


@pytest.mark.parametrize("sched", ["cosine", "step", "constant"])
def test_backbone_groups_keep_their_lr_ratio_through_the_schedule(sched):
    cfg, optimizer, scheduler = _build(["optim.lr=0.1", "optim.backbone_lr_scale=0.1", f"sched.name={sched}",
                                        "sched.warmup_epochs=1", "sched.step_epochs=1", "sched.min_lr=0.001"], epochs=4)
    shapes = [tuple(g["params"][0].shape) for g in optimizer.param_groups]
    assert shapes == [(3, 2), (3,), (2, 1, 3, 3), (2,)]  # head weight, head bias, backbone weight, backbone bias
    used, after = _drive(optimizer, scheduler, 4 * SPE)
    for lrs in used + [after]:
        head, backbone = lrs[:2], lrs[2:]
        assert head[0] == head[1] and backbone[0] == backbone[1]
        assert backbone[0] == pytest.approx(0.1 * head[0], rel=1e-12)
    peak = 0.1 * (0.1 if sched == "step" else 1.0)  # step: gamma 0.1 after step_epochs=1
    assert used[SPE][0] == pytest.approx(peak, rel=1e-12) and used[SPE][2] == pytest.approx(0.1 * peak, rel=1e-12)
    if sched == "cosine":  # the floor scales too: the backbone ends at min_lr * backbone_lr_scale
        assert after == pytest.approx([0.001, 0.001, 0.0001, 0.0001], rel=1e-12)


@pytest.mark.parametrize(
    "sched", ["cosine", "step", "multistep", "exponential", "poly", "onecycle", "cosine-per-epoch"]
)
def test_state_dict_round_trip_mid_schedule_resumes_to_identical_lrs(sched):
    name, _, per_epoch = sched.partition("-per-")
    overrides = [
        "optim.lr=0.1",
        "optim.backbone_lr_scale=0.5",
        f"sched.name={name}",
        f"sched.warmup_epochs={0 if name == 'onecycle' else 1 if per_epoch else 1.5}",
        *(["sched.interval=epoch"] if per_epoch else []),
        "sched.step_epochs=1",
        "sched.min_lr=0.003",
        "sched.milestones=[2,3]",
        "sched.gamma=0.5",
    ]
    epochs = 4
    _, optimizer, scheduler = _build(overrides, epochs)
    uninterrupted, end = _drive(optimizer, scheduler, epochs * SPE)

    for stop in (13, 15, 27):  # in the warmup, at its end, mid-decay
        _, optimizer, scheduler = _build(overrides, epochs)
        first, _ = _drive(optimizer, scheduler, stop)
        buf = io.BytesIO()  # as a checkpoint holds them: a weights-only torch file
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        _, optimizer, scheduler = _build(overrides, epochs)  # a fresh process: built from the config, then restored
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rest, resumed_end = _drive(optimizer, scheduler, epochs * SPE - stop)
        assert first + rest == uninterrupted  # bitwise the same lrs, every group, every step
        assert resumed_end == end


def _torch_epoch_schedule(lr, epochs, warmup, method, decay, main):
    """torchvision's references: the warmup scheduler, then `main(optimizer)` from the warmup's end (SequentialLR),
    stepped per epoch."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    first = main(optimizer)
    if warmup:
        warm = (
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=decay, total_iters=warmup)
            if method == "linear"
            else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=decay, total_iters=warmup)
        )
        first = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[warm, first], milestones=[warmup])
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        first.step()
    return out


@pytest.mark.parametrize("name, method, warmup, decay, main", [
    ("step", "constant", 2, 0.1, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    ("step", "linear", 0, None, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    ("cosine", "linear", 3, 0.25, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=9 - 3, eta_min=0.01)),
    ("constant", "constant", 1, None, lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0, total_iters=0)),
])
def test_per_epoch_schedules_are_torchvisions_and_change_only_at_epoch_boundaries(name, method, warmup, decay, main):
    overrides = [
        "optim.lr=0.2",
        f"sched.name={name}",
        "sched.interval=epoch",
        f"sched.warmup_epochs={warmup}",
        f"sched.warmup_method={method}",
        "sched.step_epochs=3",
        "sched.gamma=0.5",
        "sched.min_lr=0.01",
        *([f"sched.warmup_decay={decay}"] if decay is not None else []),
    ]
    _, used, _ = _lrs(overrides, 9)
    theirs = _torch_epoch_schedule(0.2, 9, warmup, method, 0.01 if decay is None else decay, main)
    for step, lr in enumerate(used):
        assert lr == pytest.approx(theirs[step // SPE], rel=1e-12, abs=1e-15), (step, lr, theirs)


def test_per_epoch_warmup_needs_whole_epochs():
    cfg = config.load(None, ["sched.interval=epoch", "sched.warmup_epochs=1.5"])
    with pytest.raises(ConfigError, match="not a whole number of epochs"):
        config.check_schedule(cfg)


def test_a_per_step_warmup_from_warmup_decay():
    _, used, _ = _lrs(["optim.lr=1.0", "sched.name=constant", "sched.warmup_epochs=1", "sched.warmup_decay=0.1"], 2)
    assert [round(u, 6) for u in used[:SPE + 1]] == [round(0.1 + 0.9 * s / SPE, 6) for s in range(SPE)] + [1.0]
    _, used, _ = _lrs(
        ["optim.lr=1.0", "sched.name=constant", "sched.warmup_epochs=1", "sched.warmup_method=constant"], 2
    )
    assert used == [0.01] * SPE + [1.0] * SPE



@pytest.mark.parametrize(
    "name, theirs",
    [
        (
            "multistep",
            lambda o, spe, total: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2 * spe, 3 * spe], gamma=0.5),
        ),
        ("exponential", lambda o, spe, total: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5 ** (1 / spe))),
        ("poly", lambda o, spe, total: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=total, power=2.0)),
        (
            "onecycle",
            lambda o, spe, total: torch.optim.lr_scheduler.OneCycleLR(
                o, max_lr=0.1, total_steps=total, pct_start=0.25, div_factor=10, final_div_factor=100,
                cycle_momentum=False,
            ),
        ),
    ],
)
def test_the_other_schedules_are_torchs_own_per_step(name, theirs):
    """Each schedule per step against torch's scheduler class of the same name, stepped after every optimizer step."""
    epochs = 5
    overrides = [
        "optim.lr=0.1", f"sched.name={name}", "sched.milestones=[2,3]", "sched.gamma=0.5", "sched.power=2.0",
        "sched.pct_start=0.25", "sched.div_factor=10", "sched.final_div_factor=100",
    ]
    _, ours, _ = _lrs(overrides, epochs)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = theirs(optimizer, SPE, SPE * epochs)
    reference = []
    for _ in range(SPE * epochs):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-15)


def test_onecycle_refuses_a_warmup_of_its_own():
    cfg = config.load(None, ["sched.name=onecycle", "sched.warmup_epochs=1"])
    with pytest.raises(ConfigError, match="onecycle has its own warmup"):
        config.check_schedule(cfg)


def test_rmsprop_is_torchvisions():
    """torchvision's references: torch.optim.RMSprop(alpha=0.9, eps=0.0316, momentum, weight_decay)."""
    cfg = config.load(None, ["optim.name=rmsprop", "optim.lr=0.064", "optim.weight_decay=1e-5"])
    optimizer = build_optimizer(_model(), cfg.optim)
    assert isinstance(optimizer, torch.optim.RMSprop)
    g = optimizer.param_groups[0]
    assert (g["lr"], g["alpha"], g["eps"], g["momentum"], g["weight_decay"]) == (0.064, 0.9, 0.0316, 0.9, 1e-5)


def test_records_report_the_lr_their_steps_trained_at(tmp_path):
    """sched.interval=epoch: an epoch's train record says the lr of that epoch (the optimizer already holds the next
    one's)."""
    from conftest import train_in_process
    from distcls.tracking.metrics import read_jsonl
    out = tmp_path / "run"
    train_in_process(
        out, "optim.lr=0.1", "sched.name=step", "sched.interval=epoch", "sched.warmup_epochs=1",
        "sched.warmup_method=constant", "sched.step_epochs=1", "sched.gamma=0.5", "train.epochs=3",
        "train.max_steps_per_epoch=4", "log.every_steps=2",
    )
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    per_epoch = {1: 0.001, 2: 0.1, 3: 0.05}  # ConstantLR 0.01 x lr, then StepLR from the warmup's end
    assert [(r["epoch"], r["lr"]) for r in records] == [
        (r["epoch"], pytest.approx(per_epoch[r["epoch"]])) for r in records
    ]
