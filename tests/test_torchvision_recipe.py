"""configs/imagenet_resnet50_tv_v2.yaml is torchvision's documented V2 ResNet-50 command, step by step:
the learning rate of every optimizer step, the weight decay of every parameter (and the optimizer's
groups), and every EMA update (which step, copy or average, the decay), each computed the way
torchvision's references/classification/train.py computes it, next to distcls's. No training."""
import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import ROOT
from distcls import config
from distcls.engine import build_optimizer, build_scheduler
from distcls.run.components import build_ema

IMAGENET_TRAIN = 1_281_167
V2 = ROOT / "configs/imagenet_resnet50_tv_v2.yaml"


# ---------------------------------------------------------------- torchvision's reference logic, restated
# (references/classification/train.py and utils.set_weight_decay of torchvision >= 0.15)

TV_NORM_CLASSES = (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def tv_param_groups(model, weight_decay, norm_weight_decay=None, bias_weight_decay=None) -> list:
    """set_weight_decay(model, wd, norm_weight_decay, custom_keys_weight_decay=[("bias", bias_wd)] when
    --bias-weight-decay is given): [(parameters, weight decay)] in its group order."""
    groups = {"other": [], "norm": []}
    decays = {"other": weight_decay, "norm": norm_weight_decay}
    if bias_weight_decay is not None:
        groups["bias"], decays["bias"] = [], bias_weight_decay

    def visit(module):
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if "bias" in groups and name == "bias":  # a custom key without a dot matches the parameter's own name
                groups["bias"].append(p)
            elif norm_weight_decay is not None and isinstance(module, TV_NORM_CLASSES):
                groups["norm"].append(p)
            else:
                groups["other"].append(p)
        for child in module.children():
            visit(child)

    visit(model)
    return [(params, decays[key]) for key, params in groups.items() if params]


def tv_lr_per_epoch(lr, epochs, warmup_epochs, warmup_method, warmup_decay, lr_min=0.0) -> list:
    """--lr-scheduler cosineannealinglr with the warmup, stepped once per epoch as train.py does."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs - warmup_epochs, eta_min=lr_min)
    warm = (
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_decay, total_iters=warmup_epochs)
        if warmup_method == "linear"
        else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=warmup_decay, total_iters=warmup_epochs)
    )
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[warm, main], milestones=[warmup_epochs])
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])  # train_one_epoch runs at this lr
        optimizer.step()  # (no gradients: nothing changes; the scheduler expects a step first)
        scheduler.step()
    return out


def tv_ema(world_size, batch_size, ema_steps, ema_decay, epochs, steps_per_epoch, warmup_epochs) -> tuple:
    """The EMA's decay and its updates [(global step counted from 1, copies)]: `i % model_ema_steps == 0`
    after step i of each epoch; AveragedModel copies while n_averaged == 0, which train.py resets
    after every update of a warmup epoch."""
    alpha = min(1.0, (1.0 - ema_decay) * (world_size * batch_size * ema_steps / epochs))
    updates, n_averaged = [], 0
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            if i % ema_steps == 0:
                updates.append((epoch * steps_per_epoch + i + 1, n_averaged == 0))
                n_averaged += 1
                if epoch < warmup_epochs:
                    n_averaged = 0
    return 1.0 - alpha, updates


# ---------------------------------------------------------------- the comparisons


@pytest.fixture(scope="module")
def v2():
    return config.load(str(V2), [])


def test_the_v2_recipe_is_torchvisions_command(v2):
    """The flags of torchvision's documented command, read from the config (the comparisons below use them)."""
    assert (
        v2.optim.name, v2.optim.lr, v2.optim.weight_decay, v2.optim.norm_weight_decay, v2.optim.bias_weight_decay,
    ) == ("sgd", 0.5, 2e-5, 0.0, None)
    assert (
        v2.sched.name, v2.sched.interval, v2.sched.warmup_epochs, v2.sched.warmup_method, v2.sched.warmup_decay,
    ) == ("cosine", "epoch", 5, "linear", 0.01)
    assert (
        v2.train.epochs, v2.data.batch_size, v2.train.ema.decay, v2.train.ema.every_steps, v2.train.ema.cadence,
    ) == (600, 1024, 0.99998, 32, "epoch")


def test_every_parameters_weight_decay_and_the_groups_are_torchvisions(v2):
    model = torchvision.models.resnet50(weights=None)
    ours = [(g["params"], g["weight_decay"]) for g in build_optimizer(model, v2.optim).param_groups]
    theirs = tv_param_groups(model, v2.optim.weight_decay, v2.optim.norm_weight_decay)
    assert [([id(p) for p in params], wd) for params, wd in ours] == [
        ([id(p) for p in params], wd) for params, wd in theirs
    ]
    # 53 convolutions' weights and fc's 2 tensors; 53 BatchNorms' 2 tensors
    assert [len(params) for params, _ in ours] == [55, 106]


def test_bias_weight_decay_alone_as_torchvision():
    """--bias-weight-decay 0 alone on ResNet-18: all 21 biases (BatchNorm's too) at 0, the other 41 tensors at the base
    decay."""
    model = torchvision.models.resnet18(weights=None)
    cfg = config.load(None, ["optim.weight_decay=1e-4", "optim.bias_weight_decay=0.0"]).optim
    ours = [(g["params"], g["weight_decay"]) for g in build_optimizer(model, cfg).param_groups]
    theirs = tv_param_groups(model, 1e-4, None, 0.0)
    assert [([id(p) for p in params], wd) for params, wd in ours] == [
        ([id(p) for p in params], wd) for params, wd in theirs
    ]
    assert [(len(params), wd) for params, wd in ours] == [(41, 1e-4), (21, 0.0)]


def test_the_learning_rate_of_every_step_is_torchvisions(v2):
    # 1,251 (torchvision's 8 x 128 per epoch, RASampler's count: the same)
    steps_per_epoch = IMAGENET_TRAIN // v2.data.batch_size
    theirs = tv_lr_per_epoch(
        v2.optim.lr, v2.train.epochs, int(v2.sched.warmup_epochs), v2.sched.warmup_method, v2.sched.warmup_decay
    )
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=v2.optim.lr)
    factor = build_scheduler(optimizer, v2.sched, v2.optim, steps_per_epoch, v2.train.epochs).lr_lambdas[0]
    worst = 0.0
    for step in range(steps_per_epoch * v2.train.epochs):
        ours, tv = v2.optim.lr * factor(step), theirs[step // steps_per_epoch]
        worst = max(worst, abs(ours - tv) / tv if tv else abs(ours))
    assert worst < 1e-12, worst  # CosineAnnealingLR's recursive form rounds differently from the closed form
    # epoch 0 at 0.01 x lr (the 0.005)
    assert theirs[0] == pytest.approx(0.005) and theirs[5] == pytest.approx(0.5)


def test_the_schedulers_steps_give_the_same_learning_rates(v2):
    """The LambdaLR stepped after each optimizer step as the trainer steps it (two epochs of a short run)."""
    steps_per_epoch = 7
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=v2.optim.lr)
    scheduler = build_scheduler(optimizer, v2.sched, v2.optim, steps_per_epoch, 10)
    theirs = tv_lr_per_epoch(v2.optim.lr, 10, 5, "linear", 0.01)
    for step in range(10 * steps_per_epoch):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(theirs[step // steps_per_epoch], rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_every_ema_update_and_its_decay_are_torchvisions(v2):
    steps_per_epoch = IMAGENET_TRAIN // v2.data.batch_size
    decay, theirs = tv_ema(
        8,
        128,
        v2.train.ema.every_steps,
        v2.train.ema.decay,
        v2.train.epochs,
        steps_per_epoch,
        int(v2.sched.warmup_epochs),
    )
    ema, schedule = build_ema(v2, nn.Linear(2, 2), steps_per_epoch)
    assert ema.decay == pytest.approx(decay, rel=1e-12) and decay == pytest.approx(0.998908, abs=1e-6)
    ours, updates = [], 0
    for step in range(1, steps_per_epoch * v2.train.epochs + 1):
        if schedule.due(step):
            ours.append((step, schedule.copies(step) or updates == 0))  # ModelEMA also copies at its first update
            updates += 1
    assert ours == theirs
    assert sum(1 for step, _ in ours if step <= steps_per_epoch) == 40  # per epoch of 1,251 steps: 0, 32, ..., 1248
    # the first update after the warmup copies too
    assert [s for s, copies in ours if copies][-1] == 5 * steps_per_epoch + 1
