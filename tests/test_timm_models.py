"""model.name=timm:<name> (the optional timm extra): built for the data, trained, resumed bitwise, with
its model EMA, evaluated, predicted and exported; timm's weights from the local Hugging Face cache only."""
import json
import os

import pytest
import torch

from conftest import (
    FAST, assert_ok, assert_user_error, cli_in_process, load_ckpt, max_weight_diff, train_at_world_sizes,
    train_in_process,
)
from distcls import config
from distcls.models import build_model
from distcls.spec import DataSpec

timm = pytest.importorskip("timm")

# A two-block ViT on the 8x8 digits at 16 px (16 patches of 4x4): no BatchNorm, weights independent of the world size.
VIT = [
    "model.name=timm:vit_tiny_patch16_224", "model.args.img_size=16", "model.args.patch_size=4", "model.args.depth=2",
    "data.image_size=16", "optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.05",
]


def test_a_timm_model_is_built_for_the_data():
    cfg = config.load(None, ["model.name=timm:resnet18", "model.dropout=0.25", "model.drop_path=0.1"])
    net = build_model(cfg.model, DataSpec(1, 7, 32))
    assert net.conv1.in_channels == 1 and net.fc.out_features == 7 and net.drop_rate == 0.25
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["model.name=timm:resnt18"], ["is not a timm model", "close matches: timm:resnet18"]),
        (
            ["model.name=timm:resnet18.bogus_tag"],
            ["'bogus_tag' is not a pretrained tag of resnet18", "its tags: a1_in1k"],
        ),
        (["model.name=timm:resnet18", "model.args.output_stride=7"], ["does not fit model.name=timm:resnet18"]),
        (
            ["model.name=timm:resnet18", "model.args.num_classes=3"],
            ["model.args.num_classes cannot be set", "comes from the data"],
        ),
        (["model.name=timm:resnet18", "model.args.no_such_argument=3"], ["does not fit model.name=timm:resnet18"]),
        (["model.name=cnn3", "model.pretrained=timm"], ["model.pretrained=timm loads timm's weights for a timm model"]),
    ],
)
def test_timm_mistakes_are_one_line_errors(tmp_path, capfd, overrides, fragments):
    proc = cli_in_process(capfd, "train", [f"run.out_dir={tmp_path / 'run'}", *FAST, "train.epochs=1", *overrides])
    assert_user_error(proc, *fragments)


def test_timm_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    """model.pretrained=timm: the weights in a Hugging Face cache laid out as hf_hub_download leaves it;
    the classifier re-initialized for the data's classes, the rest loaded; an empty cache is one error."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    hub_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id  # timm/resnet18.a1_in1k
    torch.manual_seed(0)
    published = timm.create_model("resnet18", num_classes=1000)
    snapshot = tmp_path / "hub" / f"models--{hub_id.replace('/', '--')}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    save_file(published.state_dict(), str(snapshot / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = config.load(None, ["model.name=timm:resnet18", "model.pretrained=timm"])
    before = (os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE)
    net = build_model(cfg.model, DataSpec(3, 5, 32))
    assert torch.equal(net.layer3[1].conv2.weight, published.layer3[1].conv2.weight)
    assert net.fc.out_features == 5
    assert (os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE) == before  # offline only for the build
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    from distcls.errors import UserError
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        build_model(cfg.model, DataSpec(3, 5, 32))


TRAINED = [
    "train.epochs=4", "train.ema.enabled=true", "train.ema.every_steps=2", "train.ema.decay=0.9", "checkpoint.keep=4",
]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit") / "run"
    train_in_process(out, *VIT, *TRAINED)
    return out


@pytest.mark.slow  # (acceptance: trains 4 epochs, then resumes)
def test_a_timm_model_trains_resumes_bitwise_with_its_ema(vit_run, tmp_path):
    summary = json.loads((vit_run / "summary.json").read_text())
    assert summary["test_acc"] > 0.4 and summary["ema_test_acc"] is not None  # (chance: 0.1)
    out = tmp_path / "resumed"
    train_in_process(out, *VIT, *TRAINED, resume=str(vit_run / "checkpoints/epoch_0002.pt"))
    a, b = load_ckpt(vit_run / "checkpoints/last.pt"), load_ckpt(out / "checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k]) for k in a["ema"]["weights"])


@pytest.mark.slow
def test_a_timm_checkpoint_evaluates_predicts_and_exports(vit_run, tmp_path, capfd):
    ckpt = vit_run / "checkpoints/last.pt"
    proc = cli_in_process(capfd, "evaluate", ["--checkpoint", ckpt, "--json", "--no-speed"])
    assert_ok(proc)
    assert json.loads(proc.stdout)["acc"] == pytest.approx(
        json.loads((vit_run / "summary.json").read_text())["test_acc"]
    )
    from PIL import Image
    image = tmp_path / "digit.png"
    Image.new("L", (8, 8), 128).save(image)
    proc = cli_in_process(capfd, "predict", ["--checkpoint", ckpt, "--ema", image])
    assert_ok(proc)
    assert proc.stdout.startswith(str(image))
    onnx = tmp_path / "vit.onnx"
    assert_ok(cli_in_process(capfd, "export", ["--checkpoint", ckpt, "--format", "onnx", "--out", onnx]))
    assert onnx.stat().st_size > 0


@pytest.mark.slow
def test_world_sizes_1_and_2_train_the_same_timm_weights(tmp_path):
    # SGD: Adam's division by sqrt(v) turns the all-reduce's last-bit differences of near-zero gradients into 1e-4
    checkpoints = train_at_world_sizes(tmp_path, [*VIT, "train.epochs=1", "optim.name=sgd", "optim.lr=0.01"])
    assert max_weight_diff(checkpoints[1]["model"], checkpoints[2]["model"]) <= 1e-5
