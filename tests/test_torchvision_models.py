"""model.name=torchvision:<name>: any torchvision classifier, sized to the data, trained, frozen for
transfer from torchvision weights in a local hub cache, restored for inference; bad names and
arguments are one-line errors."""
import json

import pytest
import torch
import torchvision

import fakedata
from conftest import FAST, cli_in_process, assert_user_error, load_ckpt, train_in_process
from distcls import config
from distcls.data import DataSpec
from distcls.errors import ConfigError
from distcls.models import build_model, check_forward

TINY = [
    "data.name=synthetic", "data.synthetic.size=16", "data.synthetic.train_samples=8", "data.synthetic.test_samples=4",
    "data.synthetic.num_classes=5", "data.val_fraction=0", "data.batch_size=4", "train.epochs=1",
    "train.max_steps_per_epoch=1", "optim.lr=0.01", "checkpoint.every_epochs=0",
]


SPEC = DataSpec(3, 5, 32)


def _build(name, spec=SPEC, *overrides, log=None):
    return build_model(
        config.load(None, [f"model.name=torchvision:{name}", *overrides]).model, spec, log or (lambda m: None)
    )


@pytest.mark.parametrize("name,head", [("resnet101", "fc.weight"), ("mobilenet_v3_small", "classifier.3.weight")])
def test_trains_a_step_on_cpu_and_restores_for_inference(tmp_path, name, head):
    torch.manual_seed(0)
    start = _build(name, DataSpec(3, 5, 16)).state_dict()  # run.seed=0 builds the same initial weights
    summary = train_in_process(tmp_path / "run", f"model.name=torchvision:{name}", *TINY)
    assert summary["epochs_completed"] == 1
    trained = load_ckpt(tmp_path / "run/checkpoints/last.pt")["model"]
    assert trained[head].shape[0] == 5  # num_classes from the data
    assert not torch.equal(trained[head], start[head])  # the step changed the head
    if name == "resnet101":
        return  # 170 MB of weights: restoring is the same code as for the small one
    from distcls.checkpoint.restore import restore  # a torchvision: name is not a plug-in import: no override needed
    restored = restore(str(tmp_path / "run/checkpoints/last.pt"), torch.device("cpu"))
    assert torch.equal(restored.model.state_dict()[head], trained[head]) and not restored.model.training


def test_grayscale_data_gets_a_one_channel_stem():
    spec = DataSpec(1, 10, 32)
    net = _build("mobilenet_v3_small", spec)
    assert net.features[0][0].weight.shape == (16, 1, 3, 3)
    check_forward(net, spec, "torchvision:mobilenet_v3_small")
    assert _build("vit_b_32", spec).conv_proj.in_channels == 1
    with pytest.raises(ConfigError, match="set data.channels=3"):  # pretrained RGB stem: repeat the images instead
        _build("mobilenet_v3_small", spec, "model.pretrained=w.pth")


def test_input_size_dropout_and_drop_path_reach_the_builder():
    vit = _build("vit_b_32")
    assert vit.image_size == 32 and vit.encoder.pos_embedding.shape == (1, 2, 768)  # 1 patch + the class token
    with pytest.raises(ConfigError, match=r"cannot be built for 40x40 images .*Input shape indivisible by patch size"):
        _build("vit_b_32", DataSpec(3, 5, 40))
    assert _build("mobilenet_v3_small", DataSpec(3, 5, 32), "model.dropout=0.3").classifier[2].p == 0.3
    convnext = _build("convnext_tiny", DataSpec(3, 5, 32), "model.drop_path=0.3")
    assert convnext.features[7][2].stochastic_depth.p == pytest.approx(0.3)  # the last block gets the full rate
    with pytest.raises(
        ConfigError,
        match=r"model.dropout does not fit model.name=torchvision:resnet101 .*unexpected keyword argument 'dropout'",
    ):
        _build("resnet101", DataSpec(3, 5, 32), "model.dropout=0.1")
    with pytest.raises(ConfigError, match="model.drop_path applies to model.name=torchvision:<name>"):
        config.load(None, ["model.name=cnn3", "model.drop_path=0.1"])
    with pytest.raises(ConfigError, match="model.args.num_classes cannot be set"):
        _build("resnet18", DataSpec(3, 5, 32), "model.args.num_classes=7")


def test_unknown_names_list_close_matches(tmp_path, capsys):
    with pytest.raises(ConfigError, match="close matches: torchvision:resnet101, "):
        _build("resnet1010")
    with pytest.raises(ConfigError, match=r"model.name=resnet101; did you mean torchvision:resnet101\?"):
        build_model(config.load(None, ["model.name=resnet101"]).model, DataSpec(3, 5, 32))
    proc = cli_in_process(
        capsys, "train", [f"run.out_dir={tmp_path / 'o'}", "model.name=torchvision:mobilenet_v3_smal"]
    )
    assert_user_error(proc, "model.name=torchvision:mobilenet_v3_smal is not a torchvision classifier",
                      "close matches: torchvision:mobilenet_v3_small")
    assert not (tmp_path / "o").exists()


def test_frozen_transfer_of_a_non_resnet_from_the_hub_cache(tmp_path, monkeypatch):
    """MobileNetV3 from 'torchvision weights' in $TORCH_HOME: only the head classifier.3 trains; every
    other tensor, BatchNorm statistics included, stays bitwise the file's."""
    enum = "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    file = torchvision.models.get_weight(enum).url.rsplit("/", 1)[-1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    weights = torch.load(
        fakedata.write_resnet_weights(tmp_path / "th/hub/checkpoints" / file, "mobilenet_v3_small"), weights_only=True
    )
    logged = []
    _build("mobilenet_v3_small", DataSpec(3, 3, 32), f"model.pretrained=torchvision:{enum}", "model.freeze=backbone",
           "model.verify_weights=false", log=logged.append)  # (a file made here under torchvision's name)
    assert "loaded 2" in logged[0] and "left at init: classifier.3.weight, classifier.3.bias" in logged[0]
    assert logged[1].startswith("model.freeze=backbone: only the classifier head classifier.3 trains (3,075 of ")
    flowers = fakedata.write_imagefolder(tmp_path / "flowers", per_class=4, size=20)
    train_in_process(
        tmp_path / "run",
        "data.name=imagefolder",
        f"data.root={flowers}",
        "data.image_size=32",
        "data.split=[0.75, 0, 0.25]",
        "model.name=torchvision:mobilenet_v3_small",
        f"model.pretrained=torchvision:{enum}",
        "model.freeze=backbone",
        "model.verify_weights=false",
        "data.batch_size=3",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "optim.lr=0.1",
    )
    after = load_ckpt(tmp_path / "run/checkpoints/last.pt")["model"]
    backbone = [k for k in after if not k.startswith("classifier.3.")]
    assert any("running_mean" in k for k in backbone) and len(backbone) > 200
    assert all(torch.equal(after[k], weights[k]) for k in backbone)
    assert after["classifier.3.weight"].shape == (3, 1024)


@pytest.mark.slow
def test_torchvision_models_train_at_world_size_2(tmp_path):
    import subprocess
    from conftest import ROOT, child_env, distcls_cmd, kill_process_tree
    heads = {"resnet101": "fc.weight", "mobilenet_v3_small": "classifier.3.weight"}
    runs = {}
    for name in heads:  # both jobs at once: independent torchrun jobs, mostly start-up (imports)
        out = tmp_path / name
        # 32x32: at 16x16 ResNet-101's last stage is 1x1,
        # and BatchNorm over 2 values per rank (batch 4 / 2 ranks) diverges
        args = [f"run.out_dir={out}", f"model.name=torchvision:{name}", *FAST, *TINY, "data.synthetic.size=32"]
        with open(tmp_path / f"{name}.out", "w") as stdout, open(tmp_path / f"{name}.err", "w") as stderr:
            runs[name] = subprocess.Popen(
                distcls_cmd("train", args, nproc=2), cwd=ROOT, env=child_env(), stdout=stdout, stderr=stderr
            )
    try:
        for name, proc in runs.items():
            assert proc.wait(timeout=900) == 0, (
                f"{name}: exit {proc.returncode}\n{(tmp_path / f'{name}.err').read_text()[-5000:]}"
            )
            out = tmp_path / name
            assert json.loads((out / "summary.json").read_text())["world_size"] == 2
            assert load_ckpt(out / "checkpoints/last.pt")["model"][heads[name]].shape[0] == 5
    finally:  # a failed test leaves no job training beside the next tests
        for proc in runs.values():
            kill_process_tree(proc)


def test_googlenet_from_torchvision_weights_normalizes_its_input_as_torchvision(tmp_path, monkeypatch):
    """torchvision's googlenet/inception_v3 builders set transform_input=True with their weights (ImageNet-
    normalized input mapped to the [-1, 1] scale the weights were trained on); built with weights=None
    and the file loaded afterwards, distcls fed those weights wrongly scaled inputs (no error: the flag
    has no tensor)."""
    enum = "GoogLeNet_Weights.IMAGENET1K_V1"
    file = torchvision.models.get_weight(enum).url.rsplit("/", 1)[-1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    fakedata.write_resnet_weights(tmp_path / "th/hub/checkpoints" / file, "googlenet")
    assert (
        _build(
            "googlenet", DataSpec(3, 5, 32), f"model.pretrained=torchvision:{enum}", "model.verify_weights=false"
        ).transform_input
        is True
    )
    assert _build("googlenet", DataSpec(3, 5, 32)).transform_input is False  # from scratch: torchvision's default


@pytest.mark.slow
def test_a_googlenet_checkpoint_from_torchvision_weights_restores_their_input_scaling(tmp_path, monkeypatch):
    """evaluate/predict/export restore without model.pretrained: the flag must come from the checkpoint's config."""
    from distcls.checkpoint.restore import restore
    enum = "GoogLeNet_Weights.IMAGENET1K_V1"
    file = torchvision.models.get_weight(enum).url.rsplit("/", 1)[-1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    fakedata.write_resnet_weights(tmp_path / "th/hub/checkpoints" / file, "googlenet")
    train_in_process(
        tmp_path / "run",
        "model.name=torchvision:googlenet",
        f"model.pretrained=torchvision:{enum}",
        "model.verify_weights=false",
        *TINY,
        "data.synthetic.size=32",
        "data.image_size=32",
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))  # inference needs no weights file
    assert restore(str(tmp_path / "run/checkpoints/last.pt"), torch.device("cpu")).model.transform_input is True


def test_grayscale_data_with_rgb_weights_says_set_data_channels_3(tmp_path, monkeypatch, capsys):
    """The error blamed data.mean/data.std, which the user never set (the weights brought them), and
    following it led to a second error: the images' channels are what to change."""
    enum = "ResNet18_Weights.IMAGENET1K_V1"
    file = torchvision.models.get_weight(enum).url.rsplit("/", 1)[-1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    fakedata.write_resnet_weights(tmp_path / "th/hub/checkpoints" / file, "resnet18")
    run = [
        "model.name=torchvision:resnet18", f"model.pretrained=torchvision:{enum}", "model.verify_weights=false",
        "data.image_size=32", "train.epochs=1", "train.max_steps_per_epoch=1", *FAST,
    ]
    proc = cli_in_process(capsys, "train", [f"run.out_dir={tmp_path / 'run'}", *run])  # digits: 1 channel
    assert_user_error(proc, f"model.pretrained=torchvision:{enum} was trained on 3-channel images",
                      "data.name=digits gives 1-channel images: set data.channels=3")
    assert "data.mean" not in proc.stderr
    assert train_in_process(tmp_path / "run3", *run, "data.channels=3")["global_step"] == 1  # following it works


def test_a_model_that_asserts_its_input_size_is_one_line(tmp_path, capsys):
    """torchvision's ViT asserts the image size (AssertionError): a traceback where a RuntimeError was one line."""
    proc = cli_in_process(
        capsys,
        "train",
        [
            f"run.out_dir={tmp_path}", "model.name=torchvision:vit_b_16", "model.args.image_size=64", *TINY,
            "data.image_size=32",
        ],
    )
    assert_user_error(proc, "model.name=torchvision:vit_b_16 does not accept 3x32x32 inputs", "change data.image_size")


def test_a_file_under_torchvisions_name_is_checked_against_the_hash_in_it(tmp_path, monkeypatch, capsys):
    """A random state_dict saved under torchvision's file name for ResNet-18 was loaded as ImageNet weights without a
    word."""
    import hashlib

    from distcls.errors import UserError
    from distcls.models import weights
    enum = "ResNet18_Weights.IMAGENET1K_V1"
    file = torchvision.models.get_weight(enum).url.rsplit("/", 1)[-1]  # resnet18-f37072fd.pth
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    path = fakedata.write_resnet_weights(tmp_path / "th/hub/checkpoints" / file, "resnet18")
    proc = cli_in_process(
        capsys,
        "train",
        [
            f"run.out_dir={tmp_path / 'run'}", "model.name=resnet18", f"model.pretrained=torchvision:{enum}",
            "data.channels=3", "data.image_size=32", "train.epochs=1", "train.max_steps_per_epoch=1", *FAST,
        ],
    )
    assert_user_error(
        proc, f"{path} is not the file torchvision published", "its name says f37072fd", "model.verify_weights=false"
    )
    # a file whose content matches the prefix in its name passes (the check torchvision's downloader makes)
    named = tmp_path / f"resnet18-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}.pth"
    named.write_bytes(path.read_bytes())
    weights.verify("x", named)
    with pytest.raises(UserError, match="is not the file torchvision published"):
        weights.verify("x", path)


def test_model_download_fetches_a_missing_file_through_torch_hub_with_its_hash_checked(tmp_path, monkeypatch, capsys):
    """model.download=true: the file torchvision publishes is fetched into the hub cache (served here from a
    file:// URL), its sha256 prefix checked; a file whose content does not match is refused and not kept;
    without the key, nothing is fetched and the error says how to get it."""
    import hashlib

    from distcls.models import weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    source = fakedata.write_resnet_weights(tmp_path / "published/raw.pth", "resnet18")
    good = source.with_name(f"resnet18-{hashlib.sha256(source.read_bytes()).hexdigest()[:8]}.pth")
    source.rename(good)
    monkeypatch.setattr(weights, "weights_url", lambda w: good.as_uri())
    args = [
        f"run.out_dir={tmp_path / 'run'}", "model.name=resnet18",
        "model.pretrained=torchvision:ResNet18_Weights.IMAGENET1K_V1", "data.channels=3", "data.image_size=32",
        "train.epochs=1", "train.max_steps_per_epoch=1", *FAST,
    ]
    proc = cli_in_process(capsys, "train", args)
    assert_user_error(proc, f"{good.name} is not in", "model.download=true")
    assert proc.returncode == 2
    proc = cli_in_process(capsys, "train", [*args, "model.download=true"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "th/hub/checkpoints" / good.name).read_bytes() == good.read_bytes()
    bad = good.with_name("resnet18-00000000.pth")
    good.rename(bad)
    monkeypatch.setattr(weights, "weights_url", lambda w: bad.as_uri())
    proc = cli_in_process(capsys, "train", [*args, f"run.out_dir={tmp_path / 'run2'}", "model.download=true"])
    assert_user_error(proc, "downloading", "failed", "invalid hash value")
    assert not (tmp_path / "th/hub/checkpoints" / bad.name).exists()
