"""An image folder's index (data/folder_index.py): built once by the ranks together, read by restarts,
rebuilt when the folder changed; the sample list as flat arrays; data.carve_val's meaning kept."""
import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fakedata
from conftest import ROOT, assert_ok, assert_user_error, child_env, cli_in_process, load_ckpt, train_in_process
from distcls.data import folder_index
from distcls.data.sample_table import SampleTable

RUN = [
    "data.name=imagefolder", "data.image_size=16", "model.name=cnn3", "data.batch_size=6", "log.plots=false",
    "log.every_steps=0",
]


@pytest.fixture
def tree(tmp_path):
    return fakedata.write_imagefolder(tmp_path / "inet", per_class=6, layout="split")


def _all_files(root):
    return sorted(str(p) for p in root.rglob("*.png"))


def test_a_restart_reads_the_index_without_walking_or_checking_a_file(tree, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train_in_process(out, f"data.root={tree}", *RUN, "train.epochs=1")
    assert (out / "data_index.npz").is_file()
    said = "".join(capsys.readouterr())
    assert f"image folder {tree}: indexed 27 files" in said and f"saved to {out / 'data_index.npz'}" in said

    def never(*args):
        raise AssertionError("a restart walked the tree or checked a file")
    monkeypatch.setattr(folder_index, "walk", never)
    monkeypatch.setattr("distcls.data.transforms.images.inspect_image_file", never)
    summary = train_in_process(out, f"data.root={tree}", *RUN, "train.epochs=2", resume="auto")
    assert summary["epochs_completed"] == 2 and summary["resumed_from"]["epoch"] == 1
    said = "".join(capsys.readouterr())
    assert f"read its index {out / 'data_index.npz'} (27 files; no walk, no per-file check)" in said


def test_a_restart_stats_folders_only(tree, tmp_path, monkeypatch):
    """O(folders) filesystem calls, none per file: the index's check of the tree stats each folder once."""
    index = folder_index.load_or_build(tree, tmp_path / "i.npz", save_to=tmp_path / "i.npz")
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: (calls.append(str(p)), real_stat(p, *a, **k))[1])
    again = folder_index.load_or_build(tree, tmp_path / "i.npz", save_to=tmp_path / "i.npz")
    in_tree = sorted(c for c in calls if c.startswith(str(tree)))
    folders = sorted(
        str(tree / f)
        for f in ["train", "val", *(f"{s}/{c}" for s in ("train", "val") for c in ("daisy", "roses", "tulips"))]
    )
    # each folder once (the root by its listing), no file
    assert again.read_from == tmp_path / "i.npz" and in_tree == folders
    assert [list(t) for t in again.tables.values()] == [list(t) for t in index.tables.values()]


@pytest.mark.parametrize(
    "change, said",
    [
        (
            lambda root: next((root / "train/daisy").iterdir()).rename(root / "train/daisy/renamed.png"),
            "train/daisy/ modified",
        ),
        (lambda root: (root / "val/roses/extra").mkdir(), "val/roses/ modified"),
        (lambda root: (root / "test/daisy").mkdir(parents=True), "test/ added"),
    ],
)
def test_a_changed_folder_is_indexed_again_and_named(tree, tmp_path, capsys, change, said):
    from distcls.data import index as index_cli
    assert index_cli.main([str(tree)]) == 0
    assert (tree / ".distcls_index.npz").is_file() and "indexed 27 files" in capsys.readouterr().out
    assert index_cli.main([str(tree)]) == 0 and "read its index" in capsys.readouterr().out  # unchanged: read
    change(tree)
    assert index_cli.main([str(tree)]) == 0
    out = capsys.readouterr().out
    assert (
        f"the image folder changed since {tree / '.distcls_index.npz'} was built ({said})" in out
        and "indexed 27 files" in out
    )
    assert index_cli.main([str(tree), "--rebuild"]) == 0 and "indexed 27 files" in capsys.readouterr().out


def test_a_run_uses_the_shared_index_and_a_damaged_index_is_rebuilt(tree, tmp_path, capsys):
    from distcls.data import index as index_cli
    assert index_cli.main([str(tree)]) == 0
    capsys.readouterr()
    train_in_process(tmp_path / "a", f"data.root={tree}", *RUN, "train.epochs=1")
    assert "read its index" in "".join(capsys.readouterr()) and not (tmp_path / "a/data_index.npz").exists()
    (tree / ".distcls_index.npz").write_bytes(b"not an index")
    train_in_process(tmp_path / "b", f"data.root={tree}", *RUN, "train.epochs=1")
    said = "".join(capsys.readouterr())
    assert f"the index {tree / '.distcls_index.npz'} is not usable" in said and "indexed 27 files" in said
    assert folder_index.load(tree / ".distcls_index.npz", tree).classes == ["daisy", "roses", "tulips"]


def test_bad_files_come_from_the_index_and_name_the_file(tree, tmp_path, capsys):
    bad = tree / "train/roses/img_001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG header, no IEND
    proc = cli_in_process(
        capsys, "train", [f"run.out_dir={tmp_path / 'r'}", f"data.root={tree}", *RUN, "train.epochs=1"]
    )
    assert_user_error(proc, f"image file {bad}: truncated PNG", "data.skip_bad_images=true")
    summary = train_in_process(tmp_path / "s", f"data.root={tree}", *RUN, "train.epochs=1", "data.skip_bad_images=true")
    assert summary["skipped_bad_images"] == 1
    index = folder_index.load(tmp_path / "s/data_index.npz", tree)
    assert index.bad["train"] and list(index.bad["train"].values()) == ["truncated PNG (no IEND chunk)"]
    assert index.sizes["train"].min() > 0 and int(index.sizes["train"].sum()) + int(index.sizes["val"].sum()) == sum(
        os.path.getsize(p) for p in _all_files(tree))


def test_the_sample_list_is_a_few_arrays_whatever_its_length():
    """No per-sample Python objects: a DataLoader worker reading them does not make its pages private."""
    small = SampleTable.from_pairs([(f"c/{i}.jpg", i % 3) for i in range(10)])
    large = SampleTable.from_pairs([(f"c/{i}.jpg", i % 3) for i in range(100_000)])
    objects = lambda t: len(gc.get_referents(*vars(t).values()))  # noqa: E731
    assert objects(small) == objects(large)
    assert isinstance(large.paths, np.ndarray) and large.labels.dtype == np.int32
    assert large[99_999] == ("c/99999.jpg", 0) and list(large.select([5, 2])) == [("c/5.jpg", 2), ("c/2.jpg", 2)]
    assert list(small.concat(small))[10:] == list(small)


@pytest.mark.slow
def test_two_ranks_check_disjoint_halves_and_train_as_one(tree, tmp_path):
    """Under torchrun each rank checks its share (every file once in all), and the run reads the files as one process
    does."""
    log = tmp_path / "checked"
    env = child_env({"DISTCLS_TEST_CHECK_LOG": str(log),
                     "PYTHONPATH": f"{ROOT / 'tests/pause_hook'}{os.pathsep}{ROOT}"})
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distcls.train",
            f"run.out_dir={tmp_path / 'w2'}", f"data.root={tree}", *RUN, "train.epochs=1", "dist.device=cpu",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_ok(proc)
    per_rank = [sorted((log.parent / f"{log.name}.{r}").read_text().split()) for r in (0, 1)]
    assert set(per_rank[0]).isdisjoint(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == _all_files(tree)
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1
    assert "indexed 27 files" in proc.stdout and "each of 2 ranks checked 13-14 files" in proc.stdout
    header = folder_index.load(tmp_path / "w2/data_index.npz", tree)
    assert sorted(header.checked_by) == [13, 14]


def test_a_checkpoint_from_before_carve_val_keeps_its_meaning(tree, tmp_path, capsys):
    out = tmp_path / "run"
    train_in_process(out, f"data.root={tree}", *RUN, "train.epochs=1", "data.carve_val=true", "data.val_fraction=0.2")
    ck = load_ckpt(out / "checkpoints/last.pt")
    assert ck["config"]["data"]["carve_val"] is True
    del ck["config"]["data"]["carve_val"]  # as written before the key existed
    old = tmp_path / "old.pt"
    torch.save(ck, old)
    capsys.readouterr()
    summary = train_in_process(
        tmp_path / "resumed", f"data.root={tree}", *RUN, "train.epochs=2", "data.val_fraction=0.2", resume=str(old)
    )
    said = "".join(capsys.readouterr())
    assert (
        "predates data.carve_val: it keeps its meaning" in said
        and "val/ is the test split (data.carve_val=true)" in said
    )
    assert (
        summary["test_count"] == 9 and json.loads((tmp_path / "resumed/summary.json").read_text())["global_step"] == 4
    )
    proc = cli_in_process(
        capsys,
        "train",
        [
            f"run.out_dir={tmp_path / 'refused'}", f"data.root={tree}", *RUN, "train.epochs=2", "data.val_fraction=0.2",
            "data.carve_val=false", "--resume", old,
        ],
    )
    assert_user_error(proc, "was saved with data.carve_val=true, but this run says data.carve_val=false")


def test_a_class_added_to_train_only_is_seen(tree, tmp_path, capsys):
    from distcls.data import index as index_cli
    assert index_cli.main([str(tree)]) == 0
    import shutil
    shutil.copytree(tree / "train/daisy", tree / "train/zinnia")
    assert index_cli.main([str(tree)]) == 0
    out = capsys.readouterr().out
    assert "(train/ modified" in out and "4 classes" in out


def test_the_root_may_be_given_as_dot(tree, monkeypatch, capsys):
    from distcls.data import index as index_cli
    monkeypatch.chdir(tree)
    assert index_cli.main(["."]) == 0
    assert "0 unusable" in capsys.readouterr().out
    index = folder_index.load(tree / ".distcls_index.npz", tree)
    assert sorted(str(tree / p) for t in index.tables.values() for p, _ in t) == _all_files(tree)


def test_a_bad_file_replaced_in_place_is_read_again(tree, tmp_path, capsys):
    """Replacing a file in place changes no folder's time: the few files the index calls bad are inspected again."""
    bad = next((tree / "train/roses").iterdir())
    good = bad.read_bytes()
    bad.write_bytes(b"not an image at all")
    proc = cli_in_process(
        capsys, "train", [f"run.out_dir={tmp_path / 'r'}", f"data.root={tree}", *RUN, "train.epochs=1"]
    )
    assert_user_error(proc, f"image file {bad}: not an image")
    with open(bad, "r+b") as f:  # repaired in place: same name, same folder time
        f.write(good)
    capsys.readouterr()
    summary = train_in_process(tmp_path / "r", f"data.root={tree}", *RUN, "train.epochs=1")
    said = "".join(capsys.readouterr())
    assert summary["skipped_bad_images"] == 0 and "1 file(s) the index called bad read well now" in said
    assert folder_index.load(tmp_path / "r/data_index.npz", tree).bad["train"] == {}


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b[:100], lambda b: b[:200] + bytes(x ^ 0xFF for x in b[200:260]) + b[260:]],
)
def test_a_damaged_index_file_is_built_again_never_a_traceback(tree, tmp_path, damage, capsys):
    index_file = tmp_path / "i.npz"
    folder_index.load_or_build(tree, index_file, save_to=index_file)
    index_file.write_bytes(damage(index_file.read_bytes()))
    said = []
    index = folder_index.load_or_build(tree, index_file, note=said.append, save_to=index_file)
    assert "is not usable" in said[0] and sum(len(t) for t in index.tables.values()) == 27


def test_evaluate_writes_no_index_into_the_dataset(tree, tmp_path, capsys):
    from distcls.data import index as index_cli
    out = tmp_path / "run"
    train_in_process(out, f"data.root={tree}", *RUN, "train.epochs=1")
    assert index_cli.main([str(tree)]) == 0
    # the shared index is now stale
    (tree / "val/daisy/extra.png").write_bytes(next((tree / "val/daisy").iterdir()).read_bytes())
    before = (tree / ".distcls_index.npz").read_bytes()
    proc = cli_in_process(capsys, "evaluate", ["--checkpoint", out / "checkpoints/last.pt", "--no-speed"])
    assert proc.returncode == 0, proc.stderr
    assert (tree / ".distcls_index.npz").read_bytes() == before
