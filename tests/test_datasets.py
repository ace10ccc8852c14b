"""Dataset readers on files in the official on-disk formats, and their error messages."""
import pickle
from pathlib import Path

import fakedata
import pytest
import torch

from distcls import config
from distcls.data import build_data
from distcls.errors import UserError


def _data(tmp_path, *overrides):
    return build_data(config.load(None, [f"data.root={tmp_path}", *overrides]))


def test_digits_default_split_is_80_10_10_and_seeded():
    d = build_data(config.load())
    assert (len(d.splits.train), len(d.splits.val), len(d.splits.test)) == (1437, 180, 180)
    assert d.spec.channels == 1 and d.spec.image_size == 8 and d.spec.num_classes == 10
    again = build_data(config.load())
    assert torch.equal(d.splits.test.indices, again.splits.test.indices)
    other = build_data(config.load(None, ["run.seed=1"]))
    assert not torch.equal(d.splits.test.indices, other.splits.test.indices)
    all_idx = torch.cat([d.splits.train.indices, d.splits.val.indices, d.splits.test.indices])
    assert sorted(all_idx.tolist()) == list(range(1797))


def test_cifar10_official_layout(tmp_path):
    fakedata.write_cifar10(tmp_path, per_batch=20, test=30)
    d = _data(tmp_path, "data.name=cifar10", "data.val_fraction=0.1")
    assert (len(d.splits.train), len(d.splits.val), len(d.splits.test)) == (90, 10, 30)
    assert d.spec.channels == 3 and d.spec.image_size == 32 and d.spec.class_names[0] == "airplane"
    pooled = _data(tmp_path, "data.name=cifar10", "data.split=[0.8, 0.1, 0.1]")
    assert (len(pooled.splits.train), len(pooled.splits.val), len(pooled.splits.test)) == (104, 13, 13)


def test_cifar10_pixels_and_labels_roundtrip(tmp_path):
    folder = fakedata.write_cifar10(tmp_path, per_batch=20, test=30)
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    d = _data(tmp_path, "data.name=cifar10", "data.val_fraction=0")
    src = d.splits.test.source
    assert torch.equal(src.images[4].flatten(), torch.from_numpy(raw["data"][4]))
    assert src.labels.tolist() == raw["labels"]


def test_cifar100_and_mnist_and_fashion(tmp_path):
    fakedata.write_cifar100(tmp_path)
    d = _data(tmp_path, "data.name=cifar100")
    assert d.spec.num_classes == 100 and len(d.splits.test) == 100
    fakedata.write_mnist(tmp_path, "MNIST", compress=True)
    m = _data(tmp_path, "data.name=mnist", "data.val_fraction=0.5")
    assert m.spec.channels == 1 and m.spec.image_size == 28 and (len(m.splits.train), len(m.splits.val)) == (60, 60)
    fakedata.write_mnist(tmp_path, "FashionMNIST")
    f = _data(tmp_path, "data.name=fashion_mnist", "data.channels=3", "data.image_size=32")
    assert f.spec.channels == 3 and f.spec.image_size == 32 and f.spec.class_names[-1] == "Ankle boot"


def test_imagefolder_layouts(tmp_path):
    flat = fakedata.write_imagefolder(tmp_path / "flowers", per_class=10)
    d = _data(flat, "data.name=imagefolder", "data.image_size=24", "data.split=[0.8, 0.1, 0.1]")
    assert d.spec.class_names == ("daisy", "roses", "tulips") and len(d.splits.train) == 24
    img, label, index = d.splits.train.source[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 24)
    split = fakedata.write_imagefolder(tmp_path / "inet", per_class=6, layout="split")
    # train/ + val/: all of train/ trains; val/ validates each epoch and is the final evaluation (torchvision's refs)
    s = _data(split, "data.name=imagefolder", "data.image_size=16")
    assert len(s.splits.train) == 18 and len(s.splits.val) == 9 and s.splits.test.source is s.splits.val.source
    assert list(s.splits.test.indices) == list(s.splits.val.indices) and s.splits.val.source.samples[0][0].startswith(
        str(split / "val")
    )
    # data.carve_val=true: validation carved from train/, val/ the test split (distcls's meaning before the key)
    c = _data(split, "data.name=imagefolder", "data.image_size=16", "data.carve_val=true", "data.val_fraction=0.2")
    assert len(c.splits.train) + len(c.splits.val) == 18 and len(c.splits.val) == 4 and len(c.splits.test) == 9
    assert c.splits.val.source is c.splits.train.source
    # data.split pools train/ and val/ once, not val/ twice
    assert (
        sum(
            len(v)
            for v in _data(
                split, "data.name=imagefolder", "data.image_size=16", "data.split=[0.6, 0.2, 0.2]"
            ).splits.__dict__.values()
        )
        == 27
    )


@pytest.mark.parametrize("name, fragment", [
    ("cifar10", "cifar-10-batches-py lacks data_batch_1"),
    ("cifar100", "cifar-100-python lacks train, test"),
    ("mnist", "MNIST/raw lacks train-images-idx3-ubyte"),
    ("fashion_mnist", "FashionMNIST/raw lacks"),
    ("imagefolder", "does not exist"),
])
def test_missing_dataset_says_where_to_put_what(tmp_path, name, fragment):
    with pytest.raises(UserError) as info:
        _data(tmp_path / "empty", f"data.name={name}")
    assert fragment in str(info.value)
    assert not (tmp_path / "empty").exists()  # nothing created, nothing downloaded


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path):
    folder = fakedata.write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f, protocol=2)
    with pytest.raises(UserError, match="not a valid CIFAR batch file"):
        _data(tmp_path, "data.name=cifar10")
    assert not marker.exists()


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    raw = fakedata.write_mnist(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated"):
        _data(tmp_path, "data.name=mnist")


def _mnist(tmp_path, *overrides):
    from distcls.data import build_data
    return build_data(config.load(None, [f"data.root={tmp_path}", "data.name=mnist", *overrides]))


def test_truncated_mnist_gz_names_the_file(tmp_path):
    raw = fakedata.write_mnist(tmp_path, compress=True)
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(UserError, match=f"{gz} cannot be read .*truncated or corrupt"):
        _mnist(tmp_path)


def test_idx_header_shorter_than_its_magic_says(tmp_path):
    raw = fakedata.write_mnist(tmp_path)
    f = raw / "t10k-labels-idx1-ubyte"
    f.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(UserError, match=f"{f} is truncated: its header announces 3 dimensions"):
        _mnist(tmp_path)


def test_mnist_label_out_of_range_names_the_file(tmp_path):
    """It used to fail mid-training with 'Target 200 is out of bounds'."""
    raw = fakedata.write_mnist(tmp_path)
    f = raw / "train-labels-idx1-ubyte"
    data = bytearray(f.read_bytes())
    data[-1] = 200
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{f} holds label 200, but mnist has 10 classes"):
        _mnist(tmp_path)


def _cifar_batch(folder: Path, name: str, data, labels) -> Path:
    import pickle
    with open(folder / name, "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f, protocol=2)
    return folder / name


@pytest.mark.parametrize("data_shape, labels, fragment", [
    ((10, 3000), list(range(10)), "not a multiple of 3x32x32 = 3072"),
    ((10, 3072), list(range(9)), "holds 10 images but 9 labels"),
    ((10, 3072), [200] + list(range(9)), "holds label 200, but the dataset has 10 classes"),
    ((10, 3072), [-1] + list(range(9)), "holds label -1"),
])
def test_cifar_format_errors_name_the_file(tmp_path, data_shape, labels, fragment):
    import numpy as np

    from distcls.data import build_data
    folder = fakedata.write_cifar10(tmp_path)
    path = _cifar_batch(folder, "data_batch_2", np.zeros(data_shape, dtype=np.uint8), labels)
    with pytest.raises(UserError) as info:
        build_data(config.load(None, [f"data.root={tmp_path}", "data.name=cifar10"]))
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_plugin_dataset_label_out_of_range_is_caught_at_load(tmp_path, monkeypatch):
    """The same check for any dataset builder (before training starts)."""
    (tmp_path / "bad_labels.py").write_text(
        "import torch\nfrom distcls.data import RawDataset, TensorSource\ndef build(cfg):\n    src = "
        "TensorSource(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(20) % 3 + (torch.arange(20) == 7) * "
        "50)\n    return RawDataset(train=src, test=src, class_names=['a', 'b', 'c'], mean=(0.5,), std=(0.5,))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from distcls.data import build_data
    with pytest.raises(UserError, match="the train split holds label 51, but the dataset has 3 classes"):
        build_data(config.load(None, ["data.name=bad_labels:build"]))
