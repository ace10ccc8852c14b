"""Every config in configs/ runs one short epoch on generated data in its official format."""
import json

import pytest

import fakedata
from conftest import ROOT, load_ckpt

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if not p.is_symlink())  # the links: old names


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    fakedata.write_cifar10(root, per_batch=16, test=24)
    fakedata.write_mnist(root, "MNIST", train=96, test=40, compress=True)
    fakedata.write_mnist(root, "FashionMNIST", train=96, test=40)
    fakedata.write_imagefolder(root / "flower_photos", per_class=10, size=48)
    fakedata.write_imagefolder(root / "imagenet", per_class=8, size=48, layout="split")
    fakedata.write_resnet_weights(root / "weights" / "resnet18.pth")
    return root


# Per-config shrinking: keep each recipe's model, data format and training features, make it tiny.
SHRINK = {
    "flowers_resnet18_transfer.yaml": [
        "data.root={root}/flower_photos", "model.pretrained={root}/weights/resnet18.pth", "data.image_size=32",
        "data.batch_size=8",
    ],
    "flowers_resnet18_finetune.yaml": [
        "data.root={root}/flower_photos", "model.pretrained={root}/weights/resnet18.pth", "data.image_size=32",
        "data.batch_size=8",
    ],
    "imagenet_mobilenet_v3_large_tv.yaml": [
        "data.root={root}/imagenet", "data.image_size=32", "data.eval_resize=37", "data.batch_size=8",
        "data.eval_batch_size=8",
    ],
    "imagenet_resnet50.yaml": [
        "data.root={root}/imagenet", "data.image_size=32", "data.batch_size=8", "data.eval_batch_size=8",
        "data.val_fraction=0.1",
    ],
    "imagenet_resnet50_tv_v2.yaml": [
        "data.root={root}/imagenet", "data.train_crop_size=24", "data.eval_crop_size=32", "data.eval_resize=37",
        "data.batch_size=8", "data.eval_batch_size=8", "data.val_fraction=0.1",
    ],
}


def test_every_config_is_covered():
    assert len(CONFIGS) >= 9 and "default.yaml" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
# conftest restores run.deterministic's torch flag
def test_config_runs_one_short_epoch(name, data_root, tmp_path, capsys):
    # in process, through the same run_cli + train.main that `python -m distcls.train` runs: ten
    # interpreter starts fewer (a few seconds each); test_cli_errors.py covers the real process
    from distcls import train
    from distcls.cli import run_cli

    out = tmp_path / "out"
    extra = [a.replace("{root}", str(data_root)) for a in SHRINK.get(name, ["data.batch_size=8"])]
    args = ["--config", ROOT / "configs" / name, f"data.root={data_root}", *extra, "train.epochs=1",
            "train.max_steps_per_epoch=2", "data.max_eval_samples=16", "data.num_workers=0", f"run.out_dir={out}",
            "train.sync_bn=false", "log.every_steps=1",
            # a 2-step run: a config's model EMA (every 32 steps) would never update and is refused
            "train.ema.every_steps=1"]
    if name != "default.yaml":  # the plots are the same code for every config (tests/test_outputs.py): drawn once here
        args.append("log.plots=false")
    code = run_cli(train.main, [str(a) for a in args])
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and 0.0 <= summary["test_acc"] <= 1.0
    ck = load_ckpt(out / "checkpoints/last.pt")
    assert ck["step"] == 2 and not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert (out / "plots").is_dir() == (name == "default.yaml")
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "test"} <= {r["split"] for r in records}
    for r in records:
        assert {"epoch", "step", "split", "loss", "acc", "lr", "images_per_sec", "time"} <= r.keys()


def test_an_old_config_name_still_loads_the_same_config_and_says_its_new_name(tmp_path, capsys):
    from distcls import config
    from distcls.config import RENAMED_CONFIGS
    from conftest import cli_in_process
    for old, new in RENAMED_CONFIGS.items():
        assert (ROOT / "configs" / old).resolve() == (ROOT / "configs" / new).resolve()
        assert config.load(str(ROOT / "configs" / old)) == config.load(str(ROOT / "configs" / new))
    proc = cli_in_process(
        capsys,
        "train",
        [
            "--config",
            ROOT / "configs/seed_c_cnn3_cifar10.yaml",
            f"data.root={tmp_path / 'none'}",
            f"run.out_dir={tmp_path / 'out'}",
        ],
    )
    assert proc.returncode == 2  # (no CIFAR-10 files here)
    assert (
        f"distcls: note: {ROOT / 'configs/seed_c_cnn3_cifar10.yaml'} is now {ROOT / 'configs/cifar10_cnn3.yaml'}"
        in proc.stderr
    )


def test_a_config_by_name_and_its_own_default_out_dir(tmp_path, capsys, monkeypatch):
    from conftest import assert_user_error, cli_in_process
    from distcls import config

    assert (
        config.load("cifar10_cnn3")
        == config.load("cifar10_cnn3.yaml")
        == config.load(str(ROOT / "configs/cifar10_cnn3.yaml"))
    )
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  epochs: 1\n")
    assert config.load(str(mine)).run.out_dir == "runs/mine" and config.load(None).run.out_dir == "runs/default"
    assert config.load(str(mine), [f"run.out_dir={tmp_path / 'x'}"]).run.out_dir == str(tmp_path / "x")
    assert_user_error(
        cli_in_process(capsys, "train", ["--config", "cifar10_cnn33", "--print-config"]), "did you mean cifar10_cnn3?"
    )
