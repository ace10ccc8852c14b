"""WebDataset shards (data.name=webdataset): the converter, the world-size-independent order read
shard by shard, exact resume, evaluation counting every sample once, HTTP, bad samples."""
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import (
    FAST, assert_ok, assert_user_error, cli_in_process, load_ckpt, max_weight_diff, train_at_world_sizes,
    train_in_process,
)
from fakedata import write_imagefolder
from distcls import config
from distcls.data import build_data, eval_loader, shard_source, train_loader
from distcls.data.datasets import shards as shard_dataset
from distcls.data.shard_plan import ShardSet, TrainPlan, runs_of
from distcls.errors import ConfigError

CLASSES = ("ant", "bee", "cat", "dog")
TRAIN_SHARDS, VAL_SHARDS = 7, 4  # 160 training images in shards of 25 (the last of 10), 80 validation images
GLOBAL_BATCH, STREAMS = 32, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("folder"), classes=CLASSES, per_class=40, size=24, layout="split")


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "in4"
    proc = subprocess.run(
        [sys.executable, "-m", "distcls.shard", str(folder), str(out), "--shard-size", "25"],
        capture_output=True,
        text=True,
    )
    assert_ok(proc)
    assert f"data.train_shards={out.resolve()}/train-{{000000..000006}}.tar" in proc.stdout
    return out


def shard_args(where, window: int = 16):
    where = str(where)
    return [
        "data.name=webdataset", f"data.train_shards={where}/train-{{000000..000006}}.tar",
        f"data.val_shards={where}/val-{{000000..000003}}.tar", "data.image_size=16", f"data.shard_streams={STREAMS}",
        f"data.shuffle_window={window}", f"data.batch_size={GLOBAL_BATCH}",
    ]


def built(shards, *overrides):
    cfg = config.load(
        None, [*shard_args(shards), "data.augment.random_resized_crop=true", "data.augment.hflip=true", *overrides]
    )
    return cfg, build_data(cfg)


def epoch_batches(loader, epoch: int, start_step: int = 0) -> list:
    loader.sampler.set_epoch(epoch, start_step)
    return [(b.keys.tolist(), b.labels.tolist(), b.images.clone()) for b in loader]


def test_the_converter_writes_every_image_once_with_its_label(folder, shards):
    desc = json.loads((shards / "shards.json").read_text())
    assert desc["class_names"] == list(CLASSES)
    expected = {split: Counter((CLASSES.index(p.parent.name), hashlib.sha256(p.read_bytes()).hexdigest())
                               for p in (folder / split).rglob("*.png")) for split in ("train", "val")}
    for split, n in (("train", TRAIN_SHARDS), ("val", VAL_SHARDS)):
        found = Counter()
        for i in range(n):
            name = f"{split}-{i:06d}.tar"
            samples = list(shard_source.iterate_samples(str(shards / name)))
            assert (
                desc["counts"][name]
                == len(samples)
                == (25 if i < n - 1 else (160 if split == "train" else 80) - 25 * (n - 1))
            )
            found.update((int(s["cls"]), hashlib.sha256(s["png"]).hexdigest()) for s in samples)
        assert found == expected[split]
    # the samples are written shuffled: a shard holds several classes
    assert len({int(s["cls"]) for s in shard_source.iterate_samples(str(shards / "train-000000.tar"))}) > 1


def test_global_batches_do_not_depend_on_the_world_size_and_each_stream_reads_its_shards_in_turn(shards, monkeypatch):
    cfg, data = built(shards)
    opened = []
    real_open = shard_source.open_url
    monkeypatch.setattr(shard_source, "open_url", lambda url: opened.append(url) or real_open(url))
    by_world = {}
    for world in (1, 2, 4):
        opened.clear()
        ranks = [
            epoch_batches(train_loader(data.splits.train, GLOBAL_BATCH, world, r, 0, torch.device("cpu")), epoch=1)
            for r in range(world)
        ]
        steps = [[k for rank in ranks for k in rank[s][0]] for s in range(len(ranks[0]))]
        by_world[world] = steps
        # each stream opens each of its shards once (a stream starts and ends inside at most one shard each)
        assert len(opened) <= TRAIN_SHARDS + STREAMS, opened
    assert by_world[1] == by_world[2] == by_world[4]
    keys = [k for step in by_world[1] for k in step]
    assert (
        len(by_world[1]) == 160 // STREAMS // (GLOBAL_BATCH // STREAMS) == 5
        and len(keys) == len(set(keys)) == 5 * GLOBAL_BATCH
    )
    assert set(keys) <= set(range(160))
    # another epoch, another order
    other = epoch_batches(train_loader(data.splits.train, GLOBAL_BATCH, 1, 0, 0, torch.device("cpu")), epoch=2)
    assert [b[0] for b in other] != by_world[1]


def test_workers_and_a_resume_mid_epoch_give_the_same_batches_bitwise(shards):
    cfg, data = built(shards)
    one = epoch_batches(train_loader(data.splits.train, GLOBAL_BATCH, 2, 1, 0, torch.device("cpu")), epoch=3)
    workers = epoch_batches(
        train_loader(data.splits.train, GLOBAL_BATCH, 2, 1, 0, torch.device("cpu"), num_workers=2), epoch=3
    )
    resumed = epoch_batches(
        train_loader(data.splits.train, GLOBAL_BATCH, 2, 1, 0, torch.device("cpu")), epoch=3, start_step=3
    )
    assert len(one) == 5 and len(resumed) == 2
    for a, b in zip(one, workers):
        assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    for a, b in zip(one[3:], resumed):
        assert a[:2] == b[:2] and torch.equal(a[2], b[2])


def test_evaluation_counts_every_sample_once_at_any_world_size(shards):
    cfg, data = built(shards)
    seen = {}
    for world in (1, 2, 3):
        pairs = [(k, y) for r in range(world) for b in eval_loader(data.splits.val, 14, world, r, torch.device("cpu"))
                 for k, y in zip(b.keys.tolist(), b.labels.tolist())]
        assert sorted(k for k, _ in pairs) == list(range(80))
        seen[world] = dict(pairs)
    assert seen[1] == seen[2] == seen[3]
    assert Counter(seen[1].values()) == Counter({c: 20 for c in range(4)})


def test_the_plan_cuts_the_epoch_into_equal_streams_of_whole_shards():
    shards = ShardSet(tuple(f"s{i}" for i in range(5)), (10, 10, 10, 10, 3))
    assert runs_of([4, 0, 1], shards.counts, 2, 18) == [(4, 2, 1), (0, 0, 10), (1, 0, 5)]
    plan = TrainPlan(shards, streams=4, window=4, global_batch=8, world_size=2, rank=1, seed=0)
    assert plan.stream_len == 10 and plan.per_stream == 2 and plan.steps_per_epoch == 5 and plan.my_streams == [2, 3]
    covered = Counter()
    for stream in range(4):
        windows = list(plan.windows(0, stream))
        assert sum(len(w.order) for w in windows) == 10
        for w in windows:
            assert sorted(w.order.tolist()) == list(range(sum(n for _, _, n in w.runs)))
            covered.update((shard, first + i) for shard, first, n in w.runs for i in range(n))
    assert len(covered) == 40 and max(covered.values()) == 1  # 43 samples: 40 in 4 streams of 10, each once
    resumed = list(plan.windows(0, 1, start_step=3))  # output 6: the middle of window 1 (outputs 4..7)
    assert resumed[0].skip == 2 and resumed[0].runs == list(plan.windows(0, 1))[1].runs
    with pytest.raises(ConfigError, match="multiple of the world size 3"):
        TrainPlan(shards, streams=4, window=4, global_batch=12, world_size=3, rank=0, seed=0)
    with pytest.raises(ConfigError, match="data.batch_size=6 must be a multiple of data.shard_streams=4"):
        TrainPlan(shards, streams=4, window=4, global_batch=6, world_size=1, rank=0, seed=0)


@pytest.fixture
def http_server(tmp_path):
    """`python -m http.server` on a free loopback port, serving the folders the test copies under its root."""
    root = tmp_path / "served"
    root.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(re.search(r"port (\d+)", proc.stdout.readline()).group(1))
        yield root, f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def test_shards_over_http_train_to_the_same_weights_as_on_disk(shards, tmp_path, http_server):
    root, url = http_server
    shutil.copytree(shards, root / "in4")
    args = [*shard_args(shards), "model.name=cnn3", "train.epochs=2", "data.augment.random_resized_crop=true"]
    train_in_process(tmp_path / "disk", *args)
    summary = train_in_process(tmp_path / "http", *shard_args(f"{url}/in4"), *args[len(shard_args(shards)):])
    assert summary["test_count"] == 80
    a, b = load_ckpt(tmp_path / "disk/checkpoints/last.pt"), load_ckpt(tmp_path / "http/checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not (tmp_path / "http/shards.json").exists()  # the counts came from shards.json over HTTP


def test_shards_without_a_description_are_counted_once_and_a_restart_reads_the_counts(shards, tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare)
    (bare / "shards.json").unlink()
    out = tmp_path / "run"
    train_in_process(out, *shard_args(bare), "model.name=cnn3", "train.epochs=1")
    kept = json.loads((out / "shards.json").read_text())
    assert kept["class_names"] == ["0", "1", "2", "3"]
    assert {Path(k).name: n for k, n in kept["counts"].items()} == json.loads((shards / "shards.json").read_text())[
        "counts"
    ]
    # by full path: another folder's shards of the same names are others
    assert all(Path(k).parent == bare for k in kept["counts"])
    monkeypatch.setattr(shard_dataset, "count", lambda urls: pytest.fail(f"counted again: {urls}"))
    assert (
        train_in_process(out, *shard_args(bare), "model.name=cnn3", "train.epochs=2", resume="auto")["epochs_completed"]
        == 2
    )


def _rewrite_member(src: Path, dst: Path, member: str, data: bytes) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            body = tin.extractfile(info).read()
            if info.name == member:
                body, info.size = data, len(data)
            tout.addfile(info, io.BytesIO(body))


def test_a_damaged_member_or_shard_is_a_named_bad_sample(shards, tmp_path, capfd):
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    with tarfile.open(shards / "train-000002.tar") as t:
        member = [n for n in t.getnames() if n.endswith(".png")][3]
    _rewrite_member(shards / "train-000002.tar", damaged / "train-000002.tar", member, b"\x89PNG\r\n\x1a\n" + bytes(40))
    args = [*shard_args(damaged), "model.name=cnn3", "train.epochs=1", *FAST[:1], "log.plots=false"]
    proc = cli_in_process(capfd, "train", [f"run.out_dir={tmp_path / 'a'}", *args])
    assert_user_error(proc, f"train-000002.tar member {member.rsplit('.', 1)[0]}", "data.skip_bad_images=true")
    summary = train_in_process(tmp_path / "b", *args, "data.skip_bad_images=true")
    assert summary["dropped_bad_image_reads"] == 1
    # a shard cut short: its missing samples are bad samples too, named by the shard
    shutil.copy(shards / "train-000002.tar", damaged / "train-000002.tar")
    data = (shards / "val-000001.tar").read_bytes()
    (damaged / "val-000001.tar").write_bytes(data[:len(data) // 2])
    proc = cli_in_process(
        capfd,
        "train",
        [
            f"run.out_dir={tmp_path / 'c'}",
            *args,
            "data.skip_bad_images=true",
            "data.augment.hflip=false",
            # whole evaluation batches of the cut shard are unreadable: skipped
            "data.eval_batch_size=2",
        ],
    )
    assert_ok(proc)
    assert json.loads((tmp_path / "c/summary.json").read_text())["dropped_bad_image_reads"] > 1
    proc = cli_in_process(capfd, "train", [f"run.out_dir={tmp_path / 'd'}", *args])
    assert_user_error(proc, "val-000001.tar")


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["data.val_shards=null"], ["needs data.train_shards and data.val_shards"]),
        (
            ["data.train_shards=/nowhere/train-{000..003}.tar"],
            ["shard /nowhere/train-000.tar does not exist", "and 3 more of 4"],
        ),
        (["data.shard_streams=3"], ["data.batch_size=32 must be a multiple of data.shard_streams=3"]),
        (["data.split=[0.8,0.1,0.1]"], ["remove data.split"]),
        (["data.repeats=2"], ["data.repeats=2 does not work with it yet"]),
    ],
)
def test_shard_settings_that_cannot_work_are_one_line_errors(shards, tmp_path, capfd, overrides, fragments):
    proc = cli_in_process(
        capfd, "train", [f"run.out_dir={tmp_path / 'run'}", *shard_args(shards), "train.epochs=1", *overrides]
    )
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_the_converter_refuses_a_folder_that_is_not_empty(folder, shards, capfd):
    assert_user_error(cli_in_process(capfd, "shard", [folder, shards]), "is not empty")


@pytest.mark.slow
def test_world_sizes_1_and_2_train_the_same_weights_on_shards(shards, tmp_path):
    checkpoints = train_at_world_sizes(
        tmp_path, [*shard_args(shards), "model.name=lenet", "train.epochs=2", "data.num_workers=1"]
    )
    assert max_weight_diff(checkpoints[1]["model"], checkpoints[2]["model"]) <= 1e-5


def test_a_server_that_stalls_is_a_named_error_not_a_hang(shards, tmp_path, capfd, monkeypatch):
    """A shard server that answers and then sends nothing: the read times out (shard_source.HTTP_TIMEOUT_S,
    1 s here) and the run stops with a line naming the shard."""
    import http.server
    import threading

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.endswith(".json"):
                body = (shards / "shards.json").read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\0" * 100)
            self.wfile.flush()
            release.wait(10)

        def log_message(self, *args):
            pass

    release = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(shard_source, "HTTP_TIMEOUT_S", 1)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/in4"
        proc = cli_in_process(
            capfd,
            "train",
            [
                f"run.out_dir={tmp_path / 'run'}",
                *shard_args(url),
                "train.epochs=1",
                "data.shard_streams=1",
                "data.shuffle_window=8",
            ],
        )  # the first batch reads one shard: one timeout
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert_user_error(proc, f"{url}/train-0000", "cannot be read past sample 0", "timed out")


def test_shards_of_the_same_name_in_two_folders_keep_their_own_counts(shards, tmp_path):
    """train/000000.tar and val/000000.tar: each folder's shards.json counts its own shards."""
    for split, n in (("train", TRAIN_SHARDS), ("val", VAL_SHARDS)):
        (tmp_path / split).mkdir()
        for i in range(n):
            shutil.copy(shards / f"{split}-{i:06d}.tar", tmp_path / split / f"{i:06d}.tar")
        counts = {
            f"{i:06d}.tar": json.loads((shards / "shards.json").read_text())["counts"][f"{split}-{i:06d}.tar"]
            for i in range(n)
        }
        (tmp_path / split / "shards.json").write_text(json.dumps({"class_names": list(CLASSES), "counts": counts}))
    cfg = config.load(None, [*shard_args(shards), f"data.train_shards=file://{tmp_path}/train/{{000000..000006}}.tar",
                             f"data.val_shards=file://localhost{tmp_path}/val/{{000000..000003}}.tar"])
    data = build_data(cfg)
    assert (len(data.splits.train), len(data.splits.val)) == (160, 80)


def test_the_converter_writes_other_formats_as_training_decodes_them_and_nothing_on_failure(tmp_path, capfd):
    from PIL import Image
    folder = write_imagefolder(tmp_path / "f", classes=("a", "b"), per_class=4, size=16, layout="split")
    # training reads it as RGB: so does its shard
    Image.new("CMYK", (20, 16), (0, 255, 0, 0)).save(folder / "train/a/cmyk.tif")
    out = tmp_path / "out%d"
    assert_ok(cli_in_process(capfd, "shard", [folder, out, "--shard-size", "3"]))
    members = [s for i in range(3) for s in shard_source.iterate_samples(str(out / f"train-{i:06d}.tar"))]
    assert len(members) == 9 and sum("png" in m for m in members) == 9 and not (out / ".distcls-partial").exists()
    shutil.rmtree(folder / "val/a")
    shutil.rmtree(folder / "val/b")
    (folder / "val/a").mkdir()
    assert_user_error(cli_in_process(capfd, "shard", [folder, tmp_path / "again"]), "val holds no images")
    assert not (tmp_path / "again").exists()


def test_a_resume_on_other_training_data_is_refused(shards, tmp_path, capfd):
    """The checkpoint records its training split's size: resumed on 6 of the 7 shards, its (epoch, step) would name
    other samples."""
    out = tmp_path / "run"
    train_in_process(out, *shard_args(shards), "train.epochs=1")
    fewer = [a.replace("{000000..000006}", "{000000..000005}") for a in shard_args(shards)]
    proc = cli_in_process(
        capfd, "train", [f"run.out_dir={out}", *fewer, "train.epochs=2", *FAST[:1], "--resume", "auto"]
    )
    assert_user_error(proc, "trained on a training split of 160 samples, but this data gives 150", "model.pretrained=")
    assert load_ckpt(out / "checkpoints/last.pt")["train_samples"] == 160
