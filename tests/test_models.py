"""Models sized from the data; transfer learning with a frozen backbone."""
import pytest
import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

from distcls import config
from distcls.data import DataSpec
from distcls.errors import ConfigError, UserError
from distcls.models import build_model, register_model
import fakedata

SPECS = {
    "digits": DataSpec(1, 10, 8),
    "mnist": DataSpec(1, 10, 28),
    "cifar": DataSpec(3, 10, 32),
    "c100": DataSpec(3, 100, 32),
}


def _model(name, spec, *overrides):
    return build_model(config.load(None, [f"model.name={name}", *overrides]).model, spec)


@pytest.mark.parametrize(
    "name, spec",
    [
        ("cnn2", "digits"),
        ("cnn2", "cifar"),
        ("lenet", "cifar"),
        ("lenet", "mnist"),
        ("cnn3", "digits"),
        ("cnn3", "c100"),
        ("convnet", "mnist"),
        ("convnet", "digits"),
        ("resnet18", "c100"),
        ("resnet34", "mnist"),
        ("resnet50", "cifar"),
    ],
)
def test_models_fit_the_data(name, spec):
    s = SPECS[spec]
    out = _model(name, s, "model.cifar_stem=true" if name.startswith("resnet") else "model.args={}")(
        torch.zeros(2, s.channels, s.image_size, s.image_size)
    )
    assert out.shape == (2, s.num_classes)


def test_seed_architectures_match_the_documents():
    lenet = _model("lenet", SPECS["cifar"])
    assert [m.in_features for m in lenet if isinstance(m, nn.Linear)] == [400, 120, 84]  # 16*5*5
    convnet = _model("convnet", SPECS["mnist"])
    assert [m.in_features for m in convnet if isinstance(m, nn.Linear)] == [3456]  # 6*24*24
    assert sum(isinstance(m, nn.Sigmoid) for m in convnet) == 2
    cnn2 = _model("cnn2", SPECS["mnist"])
    convs = [m for m in cnn2 if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(32, (5, 5), (2, 2)), (64, (5, 5), (2, 2))]
    stem = _model("resnet18", SPECS["cifar"], "model.cifar_stem=true")
    assert stem.conv1.kernel_size == (3, 3) and isinstance(stem.maxpool, nn.Identity)


def test_too_small_images_are_a_clear_error():
    with pytest.raises(ConfigError, match="lenet needs images of at least 16x16"):
        _model("lenet", SPECS["digits"])


def test_frozen_backbone_trains_only_the_head(tmp_path):
    weights = fakedata.write_resnet_weights(tmp_path / "r18.pth")
    model = _model("resnet18", DataSpec(3, 5, 32), f"model.pretrained={weights}", "model.freeze_backbone=true")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.bn1, FrozenBatchNorm2d)
    source = torch.load(weights, weights_only=True)
    assert torch.equal(model.layer1[0].conv1.weight, source["layer1.0.conv1.weight"])
    assert torch.equal(model.bn1.running_var, source["bn1.running_var"])
    assert model.fc.weight.shape == (5, 512)  # a new head for 5 classes


def test_pretrained_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        _model("resnet18", SPECS["cifar"], f"model.pretrained={tmp_path / 'none.pth'}")
    torch.save({"x.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="shares no tensor"):
        _model("resnet18", SPECS["cifar"], f"model.pretrained={tmp_path / 'other.pth'}")


def test_plugin_models_by_decorator_and_import_path(tmp_path, monkeypatch):
    @register_model("tiny_test_net")
    def tiny(spec, cfg, width=4):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(spec.channels * spec.image_size**2, width), nn.Linear(width, spec.num_classes)
        )

    assert _model("tiny_test_net", SPECS["digits"], "model.args.width=7")[1].out_features == 7
    (tmp_path / "my_nets.py").write_text(
        "import torch.nn as nn\ndef build(spec, cfg, hidden=3):\n    return nn.Sequential(nn.Flatten(), "
        "nn.Linear(spec.channels * spec.image_size ** 2, hidden), nn.Linear(hidden, spec.num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    net = _model("my_nets:build", SPECS["digits"], "model.args.hidden=5")
    assert net[1].out_features == 5 and net(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        _model("my_nets:nope", SPECS["digits"])
    with pytest.raises(UserError, match="do not fit model.name=cnn3"):
        _model("cnn3", SPECS["digits"], "model.args.depth=3")
