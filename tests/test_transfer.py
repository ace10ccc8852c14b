"""Transfer learning as users do it: pre-train, then frozen feature extraction or fine-tuning on a
generated image folder with another number of classes; torchvision weights from a local hub cache."""
import pytest
import torch

import fakedata
from conftest import (
    FAST, assert_user_error, cli_in_process, load_ckpt, max_weight_diff, train_at_world_sizes, train_in_process,
)
from distcls import config
from distcls.data import DataSpec
from distcls.engine import build_optimizer
from distcls.errors import ConfigError, UserError
from distcls.models import build_model

TV_NAME = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
TV_FILE = "resnet18-f37072fd.pth"  # the file name of that enum's URL


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small ResNet-18 (CIFAR stem) pre-trained by distcls on 10-class synthetic 16x16 data."""
    out = tmp_path_factory.mktemp("pre") / "run"
    train_in_process(out, "data.name=synthetic", "data.synthetic.size=16", "data.synthetic.train_samples=32",
                     "data.synthetic.test_samples=8", "model.name=resnet18", "model.cifar_stem=true", "train.epochs=1",
                     "data.batch_size=16", "data.val_fraction=0")
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return fakedata.write_imagefolder(tmp_path_factory.mktemp("fl") / "flowers", per_class=8, size=20)  # 3 classes


def _transfer(out, weights, flowers, *overrides):
    return train_in_process(
        out, "data.name=imagefolder", f"data.root={flowers}", "data.image_size=16", "data.split=[0.75, 0, 0.25]",
        "model.name=resnet18", "model.cifar_stem=true", f"model.pretrained={weights}", "train.epochs=1",
        "data.batch_size=6", "optim.lr=0.1", "data.augment.random_resized_crop=true", "train.max_steps_per_epoch=1",
        *overrides,
    )


def test_frozen_backbone_keeps_every_backbone_tensor_bitwise(tmp_path, pretrained, flowers):
    _transfer(tmp_path / "run", pretrained, flowers, "model.freeze=backbone")
    before, after = load_ckpt(pretrained)["model"], load_ckpt(tmp_path / "run/checkpoints/last.pt")["model"]
    backbone = [k for k in after if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone) and len(backbone) >= 100
    assert all(torch.equal(after[k], before[k]) for k in backbone)  # weights AND BatchNorm statistics
    assert after["fc.weight"].shape == (3, 512) and before["fc.weight"].shape == (10, 512)


def test_fine_tuning_changes_the_backbone(tmp_path, pretrained, flowers):
    _transfer(tmp_path / "run", pretrained, flowers, "model.freeze=none", "optim.backbone_lr_scale=0.1")
    before, after = load_ckpt(pretrained)["model"], load_ckpt(tmp_path / "run/checkpoints/last.pt")["model"]
    assert not torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])


def test_backbone_learns_at_the_scaled_rate():
    spec = DataSpec(3, 4, 16)
    deltas = {}
    for scale in (1.0, 0.1):
        cfg = config.load(None, ["model.name=lenet", "optim.momentum=0", "optim.weight_decay=0",
                                 "optim.lr=0.5", f"optim.backbone_lr_scale={scale}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, spec)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model, cfg.optim)
        torch.manual_seed(1)
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
        deltas[scale] = {n: p.detach() - start[n] for n, p in model.named_parameters()}
    head = [n for n in deltas[1.0] if n.startswith("11.")]  # lenet's last Linear: the head
    assert head == ["11.weight", "11.bias"]
    for name in deltas[1.0]:
        want = 1.0 if name in head else 0.1
        torch.testing.assert_close(deltas[0.1][name], deltas[1.0][name] * want, rtol=1e-4, atol=1e-8)


def test_torchvision_weights_resolve_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    spec = DataSpec(3, 5, 32)
    # (the file below is made here under torchvision's name: its hash check is off, test_torchvision_models checks it)
    cfg = config.load(
        None,
        ["model.name=resnet18", f"model.pretrained={TV_NAME}", "model.freeze=backbone", "model.verify_weights=false"],
    )
    with pytest.raises(UserError) as err:
        build_model(cfg.model, spec)
    msg = str(err.value)
    assert (
        TV_FILE in msg
        and str(tmp_path / "th" / "hub" / "checkpoints") in msg
        and f"https://download.pytorch.org/models/{TV_FILE}" in msg
    )
    weights = fakedata.write_resnet_weights(tmp_path / "th" / "hub" / "checkpoints" / TV_FILE)
    logged = []
    model = build_model(cfg.model, spec, logged.append)
    assert torch.equal(model.layer4[1].conv2.weight, torch.load(weights, weights_only=True)["layer4.1.conv2.weight"])
    assert "loaded 120 tensors, 2 left at init: fc.weight, fc.bias" in logged[0]
    # its preprocessing comes with it: 224 crop of a 256 resize, ImageNet mean/std (unless the config sets them)
    from distcls.models.weights import with_pretrained_preprocessing
    d = with_pretrained_preprocessing(cfg).data
    assert (d.image_size, d.eval_resize, d.mean) == (224, 256, [0.485, 0.456, 0.406])
    d = with_pretrained_preprocessing(config.load(None, [f"model.pretrained={TV_NAME}", "data.image_size=160"])).data
    assert d.image_size == 160 and d.eval_resize is None


def test_mismatched_or_unknown_weights_are_clear_errors(tmp_path, monkeypatch, capsys):
    weights = fakedata.write_resnet_weights(tmp_path / "r18.pth")  # 7x7 stem
    cfg = config.load(None, ["model.name=resnet18", "model.cifar_stem=true", f"model.pretrained={weights}"])
    with pytest.raises(
        UserError, match=r"tensor conv1.weight has shape \(64, 3, 7, 7\) in the file but \(64, 3, 3, 3\) in model"
    ):
        build_model(cfg.model, DataSpec(3, 10, 32))
    with pytest.raises(UserError, match="not a torchvision weights enum"):
        build_model(
            config.load(None, ["model.name=resnet18", "model.pretrained=torchvision:ResNet18_Weights.NOPE"]).model,
            DataSpec(3, 10, 32),
        )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # through the CLI: exit 2, one line
    proc = cli_in_process(
        capsys,
        "train",
        [
            f"run.out_dir={tmp_path / 'cli'}", "model.name=resnet18", f"model.pretrained={TV_NAME}",
            "model.freeze=backbone", "data.image_size=32",
        ],
    )
    assert_user_error(proc, TV_FILE, "copy it to")


def test_freeze_backbone_old_spelling():
    assert config.load(None, ["model.freeze_backbone=true", "model.pretrained=x.pth"]).model.frozen
    with pytest.raises(ConfigError, match="remove it and set model.freeze"):
        config.load(None, ["model.freeze_backbone=false", "model.freeze=backbone", "model.pretrained=x.pth"])
    with pytest.raises(ConfigError, match="needs model.pretrained"):
        config.load(None, ["model.freeze=backbone"])


@pytest.mark.slow
def test_frozen_transfer_is_world_size_invariant(tmp_path, pretrained, flowers):
    common = [
        *FAST, "data.name=imagefolder", f"data.root={flowers}", "data.image_size=16", "data.split=[0.75, 0, 0.25]",
        "model.name=resnet18", "model.cifar_stem=true", f"model.pretrained={pretrained}", "model.freeze=backbone",
        "train.epochs=2", "data.batch_size=6", "data.augment.random_resized_crop=true", "data.augment.hflip=true",
    ]
    ck = train_at_world_sizes(tmp_path, common)
    assert ck[1]["step"] == ck[2]["step"] == 2 * 3
    assert max_weight_diff(ck[1]["model"], ck[2]["model"]) <= 1e-5


def test_transfer_keys_that_would_be_silently_ignored_are_config_errors(tmp_path, capsys):
    """Model.freeze=none with model.freeze_backbone=true (which froze the backbone),
    and optim.backbone_lr_scale without pretrained weights, were accepted without a word."""
    with pytest.raises(ConfigError, match="model.freeze=none contradicts model.freeze_backbone=true"):
        config.load(None, ["model.freeze=none", "model.freeze_backbone=true", "model.pretrained=x.pth"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  freeze: none\n  pretrained: x.pth\n")
    with pytest.raises(ConfigError, match="model.freeze=none contradicts"):
        config.load(str(yaml_file), ["model.freeze_backbone=true"])
    # the old spelling alone
    assert config.load(None, ["model.freeze_backbone=true", "model.pretrained=x.pth"]).model.frozen
    out = tmp_path / "run"
    proc = cli_in_process(capsys, "train", [f"run.out_dir={out}", "optim.backbone_lr_scale=0.1"])
    assert_user_error(proc, "optim.backbone_lr_scale=0.1 needs model.pretrained")
    assert not out.exists()
    # a checkpoint's stored config still loads (evaluate, predict)
    stored = config.load(None, ["optim.backbone_lr_scale=0.1"])
    assert stored.optim.backbone_lr_scale == 0.1
