"""Image folders: keyed RandomResizedCrop, evaluation crops, decoding, bad files (generated files only)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fakedata
from conftest import (
    FAST, assert_ok, assert_user_error, child_env, load_ckpt, max_weight_diff, run_distcls, train_at_world_sizes,
    train_in_process,
)
from distcls import config
from distcls.data import build_data, train_loader
from distcls.data.file_source import default_eval_resize, load_eval_image
from distcls.data.transforms.images import BadImage, random_resized_crop_box, read_image
from distcls.data.loader import BatchLoader
from distcls.data.sampler import GlobalBatchSampler
from distcls.data.sources import SplitView
from distcls.errors import ConfigError, UserError

RRC = [
    "data.name=imagefolder", "data.image_size=16", "data.augment.random_resized_crop=true", "data.augment.hflip=true",
    "data.split=[0.8, 0.1, 0.1]", "model.name=lenet",
]


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
    assert (
        sum(boxes[k] != random_resized_crop_box(300, 400, scale, ratio, seed=5, epoch=3, key=k) for k in range(50)) > 45
    )


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
    summary = train_in_process(
        tmp_path / "run", f"data.root={root}", *RRC, "data.skip_bad_images=true", "train.epochs=1", "data.batch_size=8"
    )
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
        loader = BatchLoader(
            view, GlobalBatchSampler(len(view), len(view), 1, 0, seed=0), torch.device("cpu"), train=True
        )
        if not skip:
            with pytest.raises(UserError, match="img_000.jpg cannot be decoded.*skip_bad_images=true"):
                list(loader)
        elif any(p.endswith("daisy/img_000.jpg") for p, _ in view.source.samples):
            batches = list(loader)
            assert len(loader.dropped) == 1 and len(batches[0].labels) == len(view) - 1


def test_a_damaged_png_is_a_named_bad_file_not_a_crash(tmp_path):
    """Torchvision's PNG decoder segfaulted on it; the process, or the DataLoader
    worker, died and the file was never named."""
    root = fakedata.write_imagefolder(tmp_path / "f", per_class=4, size=24)
    bad = fakedata.write_damaged_png(root / "daisy" / "zz_damaged.png")
    probe = subprocess.run(
        [sys.executable, "-c", f"from distcls.data.transforms.images import read_image; read_image({str(bad)!r})"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 1, (probe.returncode, probe.stderr[-2000:])  # -11 was the segfault
    assert f"BadImage: image {bad} cannot be decoded" in probe.stderr
    for skip in (False, True):
        source = _data(root, f"data.skip_bad_images={str(skip).lower()}").splits.train.source
        assert any(p == str(bad) for p, _ in source.samples)  # its header and IEND pass the pre-training check
        view = SplitView(source, torch.arange(len(source)))
        loader = BatchLoader(view, GlobalBatchSampler(len(view), len(view), 1, 0, seed=0), torch.device("cpu"),
                             num_workers=2, train=True)
        if not skip:
            with pytest.raises(UserError, match="zz_damaged.png cannot be decoded.*skip_bad_images=true"):
                list(loader)
        else:
            batches = list(loader)
            assert len(loader.dropped) == 1 and "zz_damaged.png" in loader.dropped[0]
            assert len(batches[0].labels) == len(view) - 1


@pytest.mark.slow  # real processes: if the decoder crashed again, this test fails and pytest goes on
def test_training_in_the_main_process_skips_a_damaged_png(tmp_path):
    """#1: with data.num_workers=0 the decoder runs in the training process itself."""
    root = fakedata.write_imagefolder(tmp_path / "f", per_class=4, size=24, layout="split")  # 12 in train/
    bad = fakedata.write_damaged_png(root / "train" / "roses" / "zz_damaged.png")
    args = [
        f"data.root={root}", "data.name=imagefolder", "data.image_size=16", "model.name=lenet", "data.val_fraction=0",
        "data.batch_size=13", "train.epochs=1", "data.num_workers=0", "log.plots=false",
        f"run.out_dir={tmp_path / 'run'}",
    ]
    skipped = run_distcls("train", [*args, "data.skip_bad_images=true"])
    assert_ok(skipped)
    assert json.loads((tmp_path / "run/summary.json").read_text())["dropped_bad_image_reads"] == 1
    refused = run_distcls("train", [*args, f"run.out_dir={tmp_path / 'run2'}"])
    assert_user_error(refused, f"{bad} cannot be decoded", "data.skip_bad_images=true")


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels (its pixel data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_every_format_has_the_same_pixel_limit(tmp_path):
    """A 190 KB PNG took 1.7 GB; BMP had Pillow's limit, PNG and JPEG none."""
    from distcls.data.transforms.images import MAX_PIXELS
    side = 9500  # 90,250,000 pixels: just over MAX_PIXELS (89,478,485)
    assert side * side > MAX_PIXELS > 9400 * 9400
    small = tmp_path / "small.jpg"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(small)
    data = bytearray(small.read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")  # the frame's height and width
    files = {"big.jpg": bytes(data), "big.png": _png_declaring(side, side), "huge.png": _png_declaring(30000, 30000)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BadImage, match=rf"image .*{name} has .*pixels, more than distcls decodes \(89,478,485"):
            read_image(tmp_path / name, 3)
    with pytest.raises(BadImage, match="9500 x 9500 = 90,250,000 pixels"):
        read_image(tmp_path / "big.png", 3)
    assert read_image(small, 3).shape == (3, 30, 40)


def test_image_folders_and_predict_share_one_file_rule(tmp_path):
    """.gif was documented but not read; a directory named like an image and
    macOS's `._` files stopped training while predict's walk skipped them."""
    from distcls.predict import expand
    root = fakedata.write_imagefolder(tmp_path / "f", per_class=4, size=24)
    Image.new("P", (30, 20), 3).save(root / "daisy" / "anim.gif")
    (root / "roses" / "looks_like.jpg").mkdir()
    Image.new("RGB", (30, 20)).save(root / "roses" / "looks_like.jpg" / "inside.png")
    (root / "roses" / "._img_000.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble metadata")
    (root / "tulips" / ".thumbs").mkdir()
    Image.new("RGB", (30, 20)).save(root / "tulips" / ".thumbs" / "t.jpg")
    source = _data(root).splits.train.source
    read = sorted(path for path, _ in source.samples)
    assert len(read) == 12 + 2
    assert str(root / "daisy" / "anim.gif") in read and str(root / "roses" / "looks_like.jpg" / "inside.png") in read
    assert not any("._" in p or ".thumbs" in p for p in read)
    assert read_image(root / "daisy" / "anim.gif", 3).shape == (3, 20, 30)
    assert sorted(path for path, problem in expand([str(root)]) if problem is None) == read


def test_symbolic_links_to_folders_are_followed_once_as_torchvision_imagefolder(tmp_path):
    """A class folder holding a link to another folder of its images (train/cat/more -> /data/cats2):
    the images there were silently left out (pathlib's rglob does not follow links; torchvision's
    ImageFolder does). A link back to an ancestor reads each real folder once."""
    import torchvision
    from distcls.data.datasets.imagefolder import image_files
    root = fakedata.write_imagefolder(tmp_path / "f", per_class=2, size=24)
    extra = fakedata.write_imagefolder(tmp_path / "extra", classes=("more",), per_class=3, size=24) / "more"
    (root / "daisy" / "more").symlink_to(extra, target_is_directory=True)
    assert len(torchvision.datasets.ImageFolder(str(root)).samples) == 9
    assert sorted(path for path, _ in _data(root).splits.train.source.samples) == sorted(
        str(p) for p in [*image_files(root / "roses"), *image_files(root / "tulips"), *image_files(root / "daisy")])
    assert len(image_files(root / "daisy")) == 5
    (extra / "loop").symlink_to(root, target_is_directory=True)
    assert len(image_files(root / "daisy")) == 5 + 4  # roses/ and tulips/ through the loop, daisy/ not again


def test_class_folders_that_cannot_train_a_classifier_are_errors(tmp_path):
    """An empty class folder (or one of non-images) became a class with
    accuracy 0 on 0 samples, one class folder trained a 1-class classifier, and a val/ class
    absent from train/ was dropped silently."""
    root = fakedata.write_imagefolder(tmp_path / "f", per_class=4, size=24)
    (root / "lilies").mkdir()
    with pytest.raises(
        UserError, match=r"class folder .*/lilies holds no images .*add its images or remove the folder"
    ):
        _data(root)
    (root / "lilies" / "readme.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"class folder .*/lilies holds no images"):
        _data(root)
    (root / "lilies" / "readme.txt").unlink()
    (root / "lilies").rmdir()
    bad = root / "tulips"
    for p in bad.iterdir():
        p.write_bytes(b"")
    with pytest.raises(UserError, match=r"class folder .*/tulips holds no usable images"):
        _data(root, "data.skip_bad_images=true")
    one = fakedata.write_imagefolder(tmp_path / "one", classes=("cats",), per_class=6, size=24)
    with pytest.raises(UserError, match=r"holds one class folder \(cats\); a classifier needs at least 2 classes"):
        _data(one)
    split = fakedata.write_imagefolder(tmp_path / "split", per_class=4, size=24, layout="split")
    (split / "val" / "lilies").mkdir()
    Image.new("RGB", (30, 20)).save(split / "val" / "lilies" / "x.png")
    with pytest.raises(UserError, match=r"class folder .*val/lilies has no counterpart in the training classes"):
        build_data(config.load(None, [f"data.root={split}", "data.name=imagefolder", "data.image_size=16"]))


@pytest.fixture
def two_intra_op_threads():
    """torch's default on a 2-core machine (the suite runs on one thread: tests/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_image_folder_resume_is_exact(tmp_path, folder, two_intra_op_threads):
    """Also the one bitwise resume of the suite with more than one intra-op thread."""
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
    from distcls.data.transforms import gpu_decode

    data = _data(folder)
    src, keys = data.splits.train.source, [int(k) for k in data.splits.train.indices[:6]]
    items = [gpu_decode.read_item(src, k, True, 0, 3) for k in keys]
    images, labels, got_keys, bad = gpu_decode.assemble(items, src, True, 0, 3, torch.device("cpu"))
    assert not bad and got_keys.tolist() == keys
    for img, label, k in zip(images, labels, keys):
        ref_img, ref_label, _, _ = src.load(k, True, 0, 3)
        assert torch.equal(img, ref_img) and int(label) == ref_label
    with pytest.raises(UserError, match="data.gpu_decode=true needs .* CUDA"):
        BatchLoader(
            data.splits.train,
            GlobalBatchSampler(len(data.splits.train), 8, 1, 0, seed=0),
            torch.device("cpu"),
            gpu_decode=True,
        )


def test_worker_hash_equals_the_batched_hash():
    from distcls.data.transforms.augment import keyed_uniform
    from distcls.data.transforms.keys import keyed_uniform_scalar

    keys = torch.tensor([0, 1, 7, 123456789, 2 ** 40])
    batched = keyed_uniform(3, 11, keys, 101)
    assert [keyed_uniform_scalar(3, 11, int(k), 101) for k in keys] == batched.tolist()


def test_a_class_folder_whose_name_is_not_utf8_is_named_readably(tmp_path, capsys):
    """Such a folder broke the end-of-run plots (a warning), `plot` and
    `evaluate --out-dir` (TypeError traceback)."""
    import os
    from distcls import evaluate, plot
    from distcls.cli import run_cli
    root = fakedata.write_imagefolder(tmp_path / "f", per_class=6, size=24)
    os.rename(root / "roses", os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9"))
    out = tmp_path / "run"
    summary = train_in_process(
        out, f"data.root={root}", "data.name=imagefolder", "data.image_size=16", "model.name=lenet", "train.epochs=1",
        "log.plots=true", "data.batch_size=4",
    )
    assert sorted(summary["per_class_test_acc"]) == ["caf\\xe9", "daisy", "tulips"]
    captured = capsys.readouterr()
    assert "plots not written" not in captured.out + captured.err
    for name in ("confusion.png", "per_class.png"):
        (out / "plots" / name).unlink()
    assert run_cli(plot.main, [str(out)]) == 0
    assert (out / "plots" / "confusion.png").is_file()
    assert (
        run_cli(
            evaluate.main,
            ["--checkpoint", str(out / "checkpoints/last.pt"), "--out-dir", str(tmp_path / "eval"), "--no-speed"],
        )
        == 0
    )
    assert json.loads((tmp_path / "eval" / "eval_test.json").read_text())["class_names"] == [
        "caf\\xe9",
        "daisy",
        "tulips",
    ]


def test_a_training_size_that_upscales_the_images_is_a_warning(folder):
    """28 px digits trained at image folders' default 224 ran 8x upscaled at a tenth of the speed, without a word."""
    # images: 24x32 px
    notes = lambda *o: [n for n in _data(folder, *o).notes if n.startswith("warning:")]  # noqa: E731
    assert notes("data.image_size=16") == [] and notes("data.image_size=48") == []
    (warning,) = notes("data.image_size=64")
    assert "the training size 64 px is 2.7x the median shorter side (24 px) of 32 sampled training images" in warning
