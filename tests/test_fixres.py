"""Train/eval resolution (FixRes): evaluation is torchvision's Resize + CenterCrop; training crops
at data.train_crop_size; data.image_size keeps meaning both."""
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from distcls import config
from distcls.data import build_data
from distcls.data.loader import eval_loader, train_loader
from distcls.data.file_source import CropPolicy, load_eval_image
from distcls.errors import ConfigError


def _smooth(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phase = torch.rand(3, 1, 1, generator=g) * 6
    img = 127.5 + 120 * torch.sin(xx * 5 + phase) * torch.cos(yy * 4 + 2 * phase)
    return img.round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(375, 500), (480, 640), (500, 375)])
@pytest.mark.parametrize("resize, crop", [(256, 224), (232, 224), (36, 32)])
def test_evaluation_equals_torchvision_resize_then_center_crop(shape, resize, crop, interpolation):
    img = _smooth(*shape)
    mode = v2.InterpolationMode(interpolation)
    want = v2.Compose([v2.Resize(resize, interpolation=mode, antialias=True), v2.CenterCrop(crop)])(img)
    got = CropPolicy(crop, resize, interpolation=interpolation).apply(img, False, 0, 0, 0)
    assert got.shape == want.shape == (3, crop, crop)
    assert (got.int() - want.int()).abs().max() <= 1


def test_predict_decodes_like_evaluation(tmp_path):
    img = _smooth(375, 500, seed=3)
    path = tmp_path / "a.png"
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    want = v2.Compose([v2.Resize(232, antialias=True), v2.CenterCrop(176)])(img)
    assert (load_eval_image(path, 176, 3, 232).int() - want.int()).abs().max() <= 1


def _imagefolder(tmp_path, n=6):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_smooth(60, 80, seed=i + 10 * len(c)).permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def test_train_and_eval_sizes_differ_on_image_folders(tmp_path):
    root = _imagefolder(tmp_path)
    cfg = config.load(None, [f"data.root={root}", "data.name=imagefolder", "data.train_crop_size=24", "data.eval_crop_size=32",
                             "data.eval_resize=40", "data.augment.random_resized_crop=true", "data.batch_size=4",
                             "data.augment.policy=trivialaugment", "data.mix.cutmix_alpha=1.0", "data.split=[0.5,0.25,0.25]"])
    data = build_data(cfg)
    assert data.spec.image_size == 32  # the model's (evaluation) input size
    cpu = torch.device("cpu")
    train = train_loader(data.splits.train, 4, 1, 0, 0, cpu)
    batch = next(iter(train))
    assert batch.images.shape[-2:] == (24, 24)
    x, t = data.preprocess.train_batch(batch.images, batch.labels, batch.keys, 0)
    assert x.shape[-2:] == (24, 24) and t.shape == (4, 2)
    ev = next(iter(eval_loader(data.splits.test, 4, 1, 0, cpu)))
    assert ev.images.shape[-2:] == (32, 32)
    assert data.preprocess(ev.images, ev.keys, 0, train=False).shape[-2:] == (32, 32)
    path = data.splits.test.source.samples[int(data.splits.test.indices[0])][0]
    want = v2.Compose([v2.Resize(40, antialias=True), v2.CenterCrop(32)])(_read(path))
    assert (ev.images[0].int() - want.int()).abs().max() <= 1


def _read(path):
    return torch.from_numpy(__import__("numpy").array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_image_size_still_sets_both_sizes_and_in_memory_data_resizes_per_phase():
    cfg = config.load(None, ["data.name=synthetic", "data.image_size=20"])
    data = build_data(cfg)
    assert data.spec.image_size == 20 and data.preprocess.train_image_size == 20
    cfg = config.load(None, ["data.name=synthetic", "data.train_crop_size=16", "data.eval_crop_size=24"])
    data = build_data(cfg)
    images = data.splits.train.source.images[:4]
    assert data.preprocess(images, torch.arange(4), 0, train=True).shape[-1] == 16
    assert data.preprocess(images, torch.arange(4), 0, train=False).shape[-1] == 24


def test_eval_resize_smaller_than_the_eval_crop_is_a_config_error():
    with pytest.raises(ConfigError, match="data.eval_resize=200 is smaller than data.eval_crop_size=224"):
        config.load(None, ["data.eval_crop_size=224", "data.eval_resize=200"])


def test_a_model_that_cannot_take_the_training_size_is_one_line_before_training(tmp_path, capsys):
    """FixRes needs global pooling: LeNet's flatten takes one size. A smaller data.train_crop_size was
    a RuntimeError traceback at the first training step (exit 1); now one line at the build, nothing written."""
    import subprocess

    from conftest import assert_user_error
    from distcls import train
    from distcls.cli import run_cli

    out = tmp_path / "run"
    code = run_cli(train.main, [f"run.out_dir={out}", "model.name=lenet", "data.name=synthetic", "data.synthetic.size=32",
                                "data.train_crop_size=24", "data.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=1"])
    err = capsys.readouterr().err
    assert_user_error(subprocess.CompletedProcess([], code, "", err), "model.name=lenet takes 32x32 inputs but not the training size 24x24",
                      "data.train_crop_size", "global pooling")
    assert not out.exists()
