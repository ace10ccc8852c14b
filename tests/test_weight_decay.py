"""optim.norm_weight_decay / optim.bias_weight_decay: which parameter gets which decay (and lr), as
torchvision's set_weight_decay groups them (and by optim.decay_rule=by_ndim, distcls's rule before),
and that the optimizer applies it; with both null the groups are exactly the ones distcls always built."""
import pytest
import torch
import torch.nn as nn

from distcls import config
from distcls.engine import build_optimizer
from distcls.errors import ConfigError, UserError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.ReLU(),  # 0, 1, 2
        nn.Conv2d(4, 4, 3, bias=False), nn.LayerNorm([4, 4, 4]), nn.Flatten(),  # 4, 5: LayerNorm's weight is 3-d
        nn.Linear(64, 8), nn.Linear(8, 3))  # 7, 8 (the head)


def _decay_of(model, *overrides) -> dict:
    """{parameter name: (weight decay, lr)} as the optimizer's groups hold them."""
    opt = build_optimizer(model, config.load(None, ["optim.lr=0.1", "optim.weight_decay=0.5", *overrides]).optim)
    name = {p: n for n, p in model.named_parameters()}
    seen = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert name[p] not in seen, f"{name[p]} is in two groups"
            seen[name[p]] = (g["weight_decay"], g["lr"])
    assert seen.keys() == set(name.values())
    return seen


NORM = ["1.weight", "1.bias", "2.weight", "2.bias", "5.weight", "5.bias"]
BIAS = ["0.bias", "7.bias", "8.bias"]
WEIGHTS = ["0.weight", "4.weight", "7.weight", "8.weight"]


def test_null_keeps_the_old_rule_and_the_old_groups():
    model = _net()
    decay = _decay_of(model)
    for n, (wd, _) in decay.items():
        want = 0.5 if model.get_parameter(n).ndim > 1 else 0.0  # LayerNorm's 3-d weight included: the old rule
        assert wd == want, n
    opt = build_optimizer(model, config.load(None, ["optim.weight_decay=0.5"]).optim)
    params = list(model.parameters())  # the groups before these keys: [ndim > 1 at weight_decay, ndim <= 1 at 0]
    assert [(g["params"], g["weight_decay"]) for g in opt.param_groups] == [([p for p in params if p.ndim > 1], 0.5),
                                                                           ([p for p in params if p.ndim <= 1], 0.0)]


NORM_WEIGHTS, NORM_BIASES = [n for n in NORM if n.endswith("weight")], [n for n in NORM if n.endswith("bias")]


def test_norm_and_bias_decay_as_torchvisions_set_weight_decay():
    """torchvision's groups: --bias-weight-decay for every bias (a norm layer's too), --norm-weight-decay
    for the norm layers' other parameters, --weight-decay for the rest, 1-d tensors included."""
    decay = _decay_of(_net(), "optim.norm_weight_decay=0.0", "optim.bias_weight_decay=0.25")
    assert {n: decay[n][0] for n in NORM_WEIGHTS} == dict.fromkeys(NORM_WEIGHTS, 0.0)
    assert {n: decay[n][0] for n in BIAS + NORM_BIASES} == dict.fromkeys(BIAS + NORM_BIASES, 0.25)
    assert {n: decay[n][0] for n in WEIGHTS} == dict.fromkeys(WEIGHTS, 0.5)
    only_norm = _decay_of(_net(), "optim.norm_weight_decay=0.125")
    assert {n: only_norm[n][0] for n in NORM} == dict.fromkeys(NORM, 0.125)  # LayerNorm's 3-d weight too
    assert {n: only_norm[n][0] for n in BIAS} == dict.fromkeys(BIAS, 0.5)  # the other biases: weight_decay
    only_bias = _decay_of(_net(), "optim.bias_weight_decay=0.0")
    assert {n: only_bias[n][0] for n in BIAS + NORM_BIASES} == dict.fromkeys(BIAS + NORM_BIASES, 0.0)
    # BatchNorm weights too
    assert {n: only_bias[n][0] for n in WEIGHTS + NORM_WEIGHTS} == dict.fromkeys(WEIGHTS + NORM_WEIGHTS, 0.5)


def test_the_rule_before_decay_rule_stays_for_its_checkpoints():
    decay = _decay_of(_net(), "optim.norm_weight_decay=0.0", "optim.bias_weight_decay=0.25", "optim.decay_rule=by_ndim")
    assert {n: decay[n][0] for n in NORM} == dict.fromkeys(NORM, 0.0)  # a norm layer's bias is "norm", not "bias"
    assert {n: decay[n][0] for n in BIAS} == dict.fromkeys(BIAS, 0.25)
    assert {n: decay[n][0] for n in WEIGHTS} == dict.fromkeys(WEIGHTS, 0.5)
    only_norm = _decay_of(_net(), "optim.norm_weight_decay=0.125", "optim.decay_rule=by_ndim")
    assert {n: only_norm[n][0] for n in BIAS} == dict.fromkeys(BIAS, 0.0)  # null: none for 1-d tensors


def test_composed_with_the_backbone_lr_scale():
    decay = _decay_of(
        _net(), "optim.norm_weight_decay=0.0", "optim.bias_weight_decay=0.25", "optim.backbone_lr_scale=0.1"
    )
    assert decay["8.weight"] == (0.5, 0.1) and decay["8.bias"] == (0.25, 0.1)  # the head: full lr
    assert decay["7.bias"] == (0.25, pytest.approx(0.01)) and decay["1.weight"] == (0.0, pytest.approx(0.01))
    assert decay["0.weight"] == (0.5, pytest.approx(0.01))


def test_the_optimizer_applies_each_decay():
    """SGD without momentum and a zero gradient: each parameter shrinks by lr * its decay."""
    model = _net()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    opt = build_optimizer(
        model,
        config.load(
            None,
            [
                "optim.lr=0.1", "optim.momentum=0", "optim.weight_decay=0.5", "optim.norm_weight_decay=0.0",
                "optim.bias_weight_decay=0.25",
            ],
        ).optim,
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    got = {n: p.flatten()[0].item() for n, p in model.named_parameters()}
    want = {
        **dict.fromkeys(NORM_WEIGHTS, 1.0),
        **dict.fromkeys(BIAS + NORM_BIASES, 1 - 0.1 * 0.25),
        **dict.fromkeys(WEIGHTS, 1 - 0.1 * 0.5),
    }
    assert got == pytest.approx(want, rel=1e-6)


def test_torchvision_convnext_layernorm2d_is_a_norm_layer():
    from distcls.data import DataSpec
    from distcls.models import build_model
    model = build_model(config.load(None, ["model.name=torchvision:convnext_tiny"]).model, DataSpec(3, 4, 32))
    decay = _decay_of(model, "optim.norm_weight_decay=0.0", "optim.bias_weight_decay=0.25")
    # LayerNorm2d in the stem (its bias: a bias)
    assert decay["features.0.1.weight"][0] == 0.0 and decay["features.0.1.bias"][0] == 0.25
    assert decay["features.1.0.block.0.bias"][0] == 0.25  # a depthwise conv's bias
    assert decay["features.1.0.layer_scale"][0] == 0.5  # 3-d, neither norm nor bias


def test_negative_decay_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.norm_weight_decay' must be >= 0"):
        config.load(None, ["optim.norm_weight_decay=-1"])


def test_a_checkpoint_from_before_decay_rule_resumes_with_its_own_groups(tmp_path, capsys):
    """A run with optim.bias_weight_decay set whose checkpoint predates optim.decay_rule: its resume
    keeps the old groups (the optimizer state loads), says so, and stores the decided rule."""
    from conftest import load_ckpt, train_in_process
    out = tmp_path / "run"
    args = [
        "optim.bias_weight_decay=0.001", "optim.norm_weight_decay=0.0", "model.name=cnn3", "model.args.batch_norm=true",
        "data.max_train_samples=256",
    ]
    train_in_process(out, *args, "optim.decay_rule=by_ndim", "train.epochs=1")
    path = out / "checkpoints/last.pt"
    ck = load_ckpt(path)
    del ck["config"]["optim"]["decay_rule"]  # as a checkpoint written before the key
    torch.save(ck, path)
    with pytest.raises(UserError, match="'optimizer' state does not fit this run"):  # the other rule's groups: refused
        train_in_process(out, *args, "train.epochs=2", "optim.decay_rule=torchvision", resume="auto")
    capsys.readouterr()
    summary = train_in_process(out, *args, "train.epochs=2", resume="auto")
    assert summary["epochs_completed"] == 2
    assert "predates optim.decay_rule" in capsys.readouterr().err
    assert load_ckpt(path)["config"]["optim"]["decay_rule"] == "by_ndim"
    fresh = train_in_process(tmp_path / "fresh", *args, "train.epochs=1")
    assert (
        fresh["epochs_completed"] == 1
        and load_ckpt(tmp_path / "fresh/checkpoints/last.pt")["config"]["optim"]["decay_rule"] == "torchvision"
    )
