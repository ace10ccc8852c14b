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
            Image.fromarray(_smooth(60, 80, seed=i + 10 * len(c)).permute(1, 2, 0).numpy()).save(
                tmp_path / "imgs" / c / f"{i}.png"
            )
    return tmp_path / "imgs"


def test_train_and_eval_sizes_differ_on_image_folders(tmp_path):
    root = _imagefolder(tmp_path)
    cfg = config.load(
        None,
        [
            f"data.root={root}", "data.name=imagefolder", "data.train_crop_size=24", "data.eval_crop_size=32",
            "data.eval_resize=40", "data.augment.random_resized_crop=true", "data.batch_size=4",
            "data.augment.policy=trivialaugment", "data.mix.cutmix_alpha=1.0", "data.split=[0.5,0.25,0.25]",
        ],
    )
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


V2_WEIGHTS = "RegNet_Y_400MF_Weights.IMAGENET1K_V2"  # crop 224, resize 232


def _hub_file(tmp_path, monkeypatch):
    """An (empty) file where torchvision weights are looked up: the preprocessing needs no content."""
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    path = tmp_path / "th/hub/checkpoints" / torchvision.models.get_weight(V2_WEIGHTS).url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")


def test_pretrained_weights_resize_applies_only_to_their_own_crop(tmp_path, monkeypatch):
    """The weights' eval resize (232) belongs to their crop (224): with data.eval_crop_size=288 it gave
    a 288 crop of a 232 image, a zero-padded border."""
    from distcls.models.weights import with_pretrained_preprocessing
    _hub_file(tmp_path, monkeypatch)
    base = ["model.name=torchvision:regnet_y_400mf", f"model.pretrained=torchvision:{V2_WEIGHTS}"]
    assert with_pretrained_preprocessing(config.load(None, base)).data.eval_resize == 232
    assert with_pretrained_preprocessing(config.load(None, [*base, "data.eval_crop_size=224"])).data.eval_resize == 232
    d = with_pretrained_preprocessing(config.load(None, [*base, "data.eval_crop_size=288"])).data
    assert d.eval_resize is None and d.image_size == 224  # default resize 288 / 0.875 then, as without weights


def test_evaluate_and_predict_of_a_checkpoint_from_torchvision_weights_resize_as_its_run(tmp_path, monkeypatch):
    """A run from V2 weights evaluated at resize 232 (the weights' preprocessing); evaluate/predict/export
    restore without model.pretrained and used 256 (crop / 0.875): other numbers than the run's."""
    from conftest import train_in_process
    from distcls.checkpoint.restore import restore
    from distcls.data.file_source import evaluation_resize as eval_resize
    root = _imagefolder(tmp_path, n=2)
    train_in_process(
        tmp_path / "run",
        "data.name=imagefolder",
        f"data.root={root}",
        "data.image_size=16",
        "data.batch_size=2",
        "data.split=[0.5,0,0.5]",
        "model.name=resnet18",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
    )
    # as if trained from the weights at their 224 (the weights file itself is not needed any more)
    path = tmp_path / "run/checkpoints/last.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["pretrained"] = f"torchvision:{V2_WEIGHTS}"
    ckpt["config"]["data"]["image_size"] = None
    ckpt["data_spec"]["image_size"] = 224
    torch.save(ckpt, path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    restored = restore(str(path), torch.device("cpu"))
    assert restored.cfg.data.eval_resize == 232 and restored.cfg.model.pretrained is None
    assert eval_resize(restored.cfg.data, restored.spec.image_size) == 232
    assert build_data(restored.cfg).splits.test.source.policy.eval_resize == 232


def test_predict_ignores_eval_resize_for_in_memory_data_as_evaluation_does():
    """In-memory data evaluates each whole image resized to the input size; predict resized a file's
    shorter side to data.eval_resize (set by the user, or by torchvision weights' 232) and cropped."""
    from distcls.data.file_source import evaluation_resize as eval_resize

    assert (
        eval_resize(config.load(None, ["data.name=synthetic", "data.image_size=32", "data.eval_resize=40"]).data, 32)
        == 32
    )
    assert (
        eval_resize(config.load(None, ["data.name=cifar10", "data.image_size=224", "data.eval_resize=232"]).data, 224)
        == 224
    )
    assert (
        eval_resize(
            config.load(None, ["data.name=imagefolder", "data.image_size=224", "data.eval_resize=232"]).data, 224
        )
        == 232
    )
    assert eval_resize(config.load(None, ["data.name=imagefolder", "data.image_size=224"]).data, 224) == 256


def test_a_fixed_size_network_with_a_smaller_training_size_is_one_error_line(tmp_path):
    """lenet (a Linear on the flattened features) at train 16 / eval 24: a RuntimeError traceback at the first step."""
    from conftest import train_in_process
    from distcls.errors import UserError

    with pytest.raises(
        UserError,
        match=r"model.name=lenet takes 24x24 evaluation inputs but not the 16x16 training images .*global pooling",
    ):
        train_in_process(
            tmp_path / "run",
            "data.name=synthetic",
            "data.synthetic.size=24",
            "data.synthetic.train_samples=16",
            "data.synthetic.test_samples=8",
            "data.batch_size=8",
            "train.epochs=1",
            "model.name=lenet",
            "data.train_crop_size=16",
            "data.eval_crop_size=24",
        )


def test_eval_resize_smaller_than_the_default_eval_crop_of_image_folders_is_an_error(tmp_path):
    """data.eval_resize=200 without a crop size: image folders evaluate a 224 crop, and the config check
    (which sees no crop size) let a 224 crop of a 200 image through, its border zero-padded."""
    root = _imagefolder(tmp_path, n=4)
    with pytest.raises(ConfigError, match="data.eval_resize=200 is smaller than the evaluation crop 224"):
        build_data(config.load(None, [f"data.root={root}", "data.name=imagefolder", "data.eval_resize=200"]))
    assert (
        build_data(
            config.load(None, [f"data.root={root}", "data.name=imagefolder", "data.eval_resize=224"])
        ).spec.image_size
        == 224
    )
