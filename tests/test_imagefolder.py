"""Image folders: keyed RandomResizedCrop, evaluation crops, decoding, bad files (generated files only)."""
import numpy as np
import pytest
import torch
from PIL import Image

import fakedata
from conftest import FAST, load_ckpt, max_weight_diff, train_at_world_sizes, train_in_process
from distcls import config
from distcls.data import build_data, train_loader
from distcls.data.file_source import default_eval_resize, load_eval_image
from distcls.data.images import BadImage, random_resized_crop_box, read_image
from distcls.data.loader import BatchLoader
from distcls.data.sampler import GlobalBatchSampler
from distcls.errors import ConfigError, UserError

RRC = ["data.name=imagefolder", "data.image_size=16", "data.augment.random_resized_crop=true", "data.augment.hflip=true",
       "data.split=[0.8, 0.1, 0.1]", "model.name=lenet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fakedata.write_imagefolder(tmp_path_factory.mktemp("if") / "flowers", per_class=12, size=24)


def _data(root, *overrides):
    return build_data(config.load(None, [f"data.root={root}", *RRC, *overrides]))


def test_random_resized_crop_boxes_follow_torchvision_ranges_and_the_key():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = [random_resized_crop_box(300, 400, scale, ratio, seed=5, epoch=2, key=k) for k in range(300)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        assert 0.08 * 120000 * 0.9 <= h * w <= 120000
    fractions = [h * w / 120000 for _, _, h, w in boxes]
    assert min(fractions) < 0.2 and max(fractions) > 0.8  # the whole scale range is used
    assert len(set(boxes)) > 290
    # a pure function of (seed, epoch, key): same inputs same box; another epoch another box
    assert boxes[7] == random_resized_crop_box(300, 400, scale, ratio, seed=5, epoch=2, key=7)
    assert sum(boxes[k] != random_resized_crop_box(300, 400, scale, ratio, seed=5, epoch=3, key=k) for k in range(50)) > 45


def test_a_sample_is_cropped_the_same_whichever_rank_or_worker_loads_it(folder):
    data = _data(folder)
    view = data.splits.train
    n = len(view) - len(view) % 8

    def epoch_images(world, rank, workers, epoch):
        loader = train_loader(view, 8, world, rank, seed=0, device=torch.device("cpu"), num_workers=workers)
        out = {}
        for e in range(epoch + 1):  # iterate earlier epochs first: persistent workers must see the new epoch
            loader.sampler.set_epoch(e)
            for batch in loader:
                if e == epoch:
                    out.update({int(k): img for k, img in zip(batch.keys, batch.images)})
        return out

    single = epoch_images(1, 0, 0, epoch=1)
    assert len(single) == n
    split = {**epoch_images(2, 0, 1, epoch=1), **epoch_images(2, 1, 0, epoch=1)}
    assert split.keys() == single.keys() and all(torch.equal(split[k], single[k]) for k in single)
    epoch0 = epoch_images(1, 0, 0, epoch=0)
    both = epoch0.keys() & single.keys()  # (the dropped partial batch differs per epoch)
    assert sum(not torch.equal(epoch0[k], single[k]) for k in both) > len(both) // 2  # crops change with the epoch


def test_evaluation_resizes_to_eval_resize_then_center_crops(tmp_path):
    from torchvision.transforms import v2

    y, x = np.mgrid[0:120, 0:160]
    img = np.stack([128 + 100 * np.sin(x / 20.0), 128 + 100 * np.cos(y / 16.0), (x + y) * 0.9], -1).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    chw = torch.from_numpy(img).permute(2, 0, 1)

    def ref(resize, size):
        return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])(chw).float()

    ours = load_eval_image(tmp_path / "x.png", 48, 3, eval_resize=64).float()
    assert ours.shape == (3, 48, 48)
    assert (ours - ref(64, 48)).abs().mean() < 2.0  # crop-then-resize: the same region, within resampling error
    assert (ours - ref(48, 48)).abs().mean() > 8.0  # (a plain resize to 48 would be another image)
    default = load_eval_image(tmp_path / "x.png", 48, 3)  # default eval_resize = 48 / 0.875 = 55 (224 -> 256)
    assert torch.equal(default, load_eval_image(tmp_path / "x.png", 48, 3, eval_resize=55))
    assert default_eval_resize(224) == 256


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(12, 65503, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    t = read_image(tmp_path / "g16.png", 1)
    assert t.dtype == torch.uint8 and int(t.min()) == 0 and int(t.max()) == 255
    assert abs(float(t.float().mean()) - 127.5) < 3  # a ramp stays a ramp (clipping gave 224..255)
    rgb = read_image(tmp_path / "g16.png", 3)
    assert torch.equal(rgb[0], t[0]) and torch.equal(rgb[2], t[0])
    Image.fromarray(np.linspace(0, 1, 32 * 32).reshape(32, 32).astype(np.float32), mode="F").save(tmp_path / "f.tif")
    f = read_image(tmp_path / "f.tif", 1)
    assert int(f.min()) == 0 and int(f.max()) == 255 and abs(float(f.float().mean()) - 127.5) < 3


def test_image_folder_config_errors():
    with pytest.raises(ConfigError, match="data.eval_resize=200 is smaller than data.image_size=224"):
        config.load(None, ["data.image_size=224", "data.eval_resize=200"])
    with pytest.raises(ConfigError, match="data.augment.scale' must be"):
        config.load(None, ["data.augment.scale=[0.5, 1.5]"])
    with pytest.raises(ConfigError, match="data.augment.ratio' must be"):
        config.load(None, ["data.augment.ratio=[2, 1]"])



def _bad_folder(tmp_path):
    root = fakedata.write_imagefolder(tmp_path / "bad", per_class=12, size=24)
    (root / "daisy" / "empty.jpg").write_bytes(b"")
    (root / "roses" / "notes.png").write_text("not an image at all")
    good = (root / "tulips" / "img_000.jpg").read_bytes()
    (root / "tulips" / "cut.jpg").write_bytes(good[: len(good) // 2])
    return root


def test_bad_image_files_are_named_before_training(tmp_path):
    root = _bad_folder(tmp_path)
    with pytest.raises(UserError, match=r"empty\.jpg: empty file \(and 2 more\).*data.skip_bad_images=true"):
        _data(root)


def test_skip_bad_images_leaves_them_out_and_counts_them(tmp_path):
    root = _bad_folder(tmp_path)
    data = _data(root, "data.skip_bad_images=true")
    assert len(data.skipped_files) == 3 and any("truncated JPEG" in s for s in data.skipped_files)
    n = len(data.splits.train) + len(data.splits.val) + len(data.splits.test)
    assert n == 36  # the 36 good images, split identically on every rank
    summary = train_in_process(tmp_path / "run", f"data.root={root}", *RRC, "data.skip_bad_images=true", "train.epochs=1",
                               "data.batch_size=8")
    assert summary["skipped_bad_images"] == 3 and summary["dropped_bad_image_reads"] == 0


def test_a_file_that_fails_to_decode_mid_epoch_is_named_or_dropped(tmp_path):
    root = fakedata.write_imagefolder(tmp_path / "f", per_class=4, size=24)
    bad = root / "daisy" / "img_000.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64 + b"\xff\xd9")  # passes the header check, cannot be decoded
    with pytest.raises(BadImage, match="img_000.jpg cannot be decoded"):
        read_image(bad, 3)
    for skip in (False, True):
        data = _data(root, f"data.skip_bad_images={str(skip).lower()}", "data.split=[0.9, 0, 0.1]")
        view = data.splits.train
        loader = BatchLoader(view, GlobalBatchSampler(len(view), len(view), 1, 0, seed=0), torch.device("cpu"), train=True)
        if not skip:
            with pytest.raises(UserError, match="img_000.jpg cannot be decoded.*skip_bad_images=true"):
                list(loader)
        elif any(p.endswith("daisy/img_000.jpg") for p, _ in view.source.samples):
            batches = list(loader)
            assert len(loader.dropped) == 1 and len(batches[0].labels) == len(view) - 1


def test_image_folder_resume_is_exact(tmp_path, folder):
    common = [f"data.root={folder}", *RRC, "data.batch_size=8", "sched.name=constant", "data.augment.rotation_deg=5"]
    full = train_in_process(tmp_path / "full", *common, "train.epochs=2")
    train_in_process(tmp_path / "cut", *common, "train.epochs=1")
    resumed = train_in_process(tmp_path / "cut", *common, "train.epochs=2", resume="auto")
    a, b = load_ckpt(tmp_path / "full/checkpoints/last.pt"), load_ckpt(tmp_path / "cut/checkpoints/last.pt")
    assert a["step"] == b["step"] > 0
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["test_acc"] == full["test_acc"]


@pytest.mark.slow
def test_image_folder_world_size_invariance(tmp_path, folder):
    common = [*FAST, f"data.root={folder}", *RRC, "data.batch_size=8", "train.epochs=2", "data.num_workers=1"]
    ck = train_at_world_sizes(tmp_path, common)
    assert ck[1]["step"] == ck[2]["step"] == 2 * (29 // 8)
    assert max_weight_diff(ck[1]["model"], ck[2]["model"]) <= 1e-5


def test_gpu_decode_path_matches_the_worker_path(folder, tmp_path):
    # data.gpu_decode's batch assembly, run with torchvision's CPU JPEG decoder (no GPU here):
    # the same samples, labels and keyed crops as the worker path.
    from distcls.data import gpu_decode

    data = _data(folder)
    src, keys = data.splits.train.source, [int(k) for k in data.splits.train.indices[:6]]
    items = [gpu_decode.read_item(src, k, True, 0, 3) for k in keys]
    images, labels, got_keys, bad = gpu_decode.assemble(items, src, True, 0, 3, torch.device("cpu"))
    assert not bad and got_keys.tolist() == keys
    for img, label, k in zip(images, labels, keys):
        ref_img, ref_label, _, _ = src.load(k, True, 0, 3)
        assert torch.equal(img, ref_img) and int(label) == ref_label
    with pytest.raises(UserError, match="data.gpu_decode=true needs .* CUDA"):
        BatchLoader(data.splits.train, GlobalBatchSampler(len(data.splits.train), 8, 1, 0, seed=0), torch.device("cpu"), gpu_decode=True)


def test_worker_hash_equals_the_batched_hash():
    from distcls.data.augment import keyed_uniform
    from distcls.data.images import keyed_uniform_scalar

    keys = torch.tensor([0, 1, 7, 123456789, 2 ** 40])
    batched = keyed_uniform(3, 11, keys, 101)
    assert [keyed_uniform_scalar(3, 11, int(k), 101) for k in keys] == batched.tolist()
