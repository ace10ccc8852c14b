"""Every ingredient of the modern recipe at once (TrivialAugment, random erasing, Mixup+CutMix,
repeated augmentation, train/eval resolution, label smoothing, RandomResizedCrop+flip on an image
folder): the guarantees still hold, the same weights at world sizes 1 and 2 and a bitwise resume."""
from pathlib import Path

import pytest
import torch

import fakedata
from conftest import ROOT, load_ckpt, max_weight_diff, run_in_process, train_at_world_sizes, train_in_process

pytestmark = pytest.mark.slow  # several training runs, one under torchrun

RECIPE = ["data.name=imagefolder", "data.augment.random_resized_crop=true", "data.augment.hflip=true",
          "data.augment.policy=trivialaugment", "data.augment.erase_prob=0.5", "data.mix.mixup_alpha=0.2",
          "data.mix.cutmix_alpha=1.0", "data.repeats=2", "data.train_crop_size=16", "data.eval_crop_size=24",
          "data.eval_resize=28", "train.label_smoothing=0.1", "data.batch_size=8", "train.epochs=2",
          "model.name=recipe_model:build", "log.plots=false", "log.every_steps=0", "sched.name=constant"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fakedata.write_imagefolder(tmp_path_factory.mktemp("recipe") / "flowers", per_class=12, size=40)


def test_every_ingredient_on_reaches_the_same_weights_at_world_sizes_1_and_2(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}:{Path(__file__).parent}")  # the torchrun ranks import recipe_model
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # and so does this process
    args = [f"data.root={folder}", *RECIPE, "data.num_workers=1"]
    ck = train_at_world_sizes(tmp_path, args)  # world size 1 in this process, 2 under torchrun
    assert ck[1]["step"] == ck[2]["step"] > 2
    assert max_weight_diff(ck[1]["model"], ck[2]["model"]) <= 1e-5


def test_every_ingredient_on_sigterm_mid_epoch_then_resume_is_bitwise(tmp_path, folder, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from distcls.run.runner import Stopped
    args = [f"data.root={folder}", *RECIPE]
    full = train_in_process(tmp_path / "full", *args)
    out = tmp_path / "stopped"
    stopped = run_in_process(out, *args, "model.args.stop_at=5")  # SIGTERM in epoch 2's second step
    assert isinstance(stopped, Stopped) and stopped.signal_name == "SIGTERM"
    ck = load_ckpt(out / "checkpoints/last.pt")
    assert ck["epoch"] == 1 and ck["epoch_step"] == 2  # mid-epoch
    resumed = train_in_process(out, *args, resume="auto")
    a, b = load_ckpt(tmp_path / "full/checkpoints/last.pt"), load_ckpt(out / "checkpoints/last.pt")
    assert a["step"] == b["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["test_acc"] == full["test_acc"]
