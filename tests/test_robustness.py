"""Issue 9: bad inputs and faults found by an adversarial sweep. Each test reproduces one defect
(its number in the issue is in the test's docstring): a damaged file or a user's mistake gets
exit 2 and ONE `distcls: error:` line, and nothing of a run is lost or overwritten."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, assert_ok, assert_user_error, child_env, load_ckpt, run_in_process, train_in_process
from distcls import config, evaluate, predict, train
from distcls.runtime import dist
from distcls.cli import run_cli
from distcls.errors import ConfigError, UserError
from distcls.runtime.atomic_files import UnreadableCheckpoint, load_weights_only
from distcls.tracking.metrics import read_jsonl
import fakedata


def cli(capsys, main, args) -> subprocess.CompletedProcess:
    """A distcls command in-process through the real CLI wrapper, as a finished process."""
    capsys.readouterr()
    code = run_cli(main, [str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


SHORT = ["train.max_steps_per_epoch=5"]  # the runs below resume the fixture's run: same steps per epoch


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-epoch run: last.pt, best.pt, epoch_0001.pt, epoch_0002.pt, metrics, summary."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_in_process(out, *SHORT, "train.epochs=2")
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def _replace(path: Path, data: bytes) -> None:
    """New bytes under the name (unlink first: epoch and best files may be hard links of one inode)."""
    path.unlink()
    path.write_bytes(data)


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        member = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 1000)
    offset = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra) + member.file_size // 2
    data[offset] ^= 0x10
    _replace(path, bytes(data))


CORRUPTIONS = {
    "text": lambda p: _replace(p, b"hello\n"),
    "random_bytes": lambda p: _replace(p, os.urandom(4096)),
    "flipped_bit": _flip_a_bit,
    "truncated": lambda p: _replace(p, p.read_bytes()[: p.stat().st_size // 2]),
}


# ----------------------------------------------------------------------------- 1. one run per out_dir


def test_second_run_at_an_out_dir_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    """#1: a second run at an out_dir in use exits 2 naming the holder; released, the out_dir is usable."""
    out = tmp_path / "run"
    cfg = config.load(None, [f"run.out_dir={out}", *FAST, "train.epochs=1"])
    from distcls.run.runner import TrainingRun
    first = TrainingRun(cfg, dist.detect())
    try:
        proc = cli(capsys, train.main, [f"run.out_dir={out}", *FAST, "train.epochs=1"])
        assert_user_error(proc, f"run.out_dir={out} is in use by another distcls run (pid {os.getpid()} on host", "choose another run.out_dir")
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        first.close()
    second = TrainingRun(cfg, dist.detect())  # released: the next run may take it
    second.close()


def test_failed_run_leaves_no_out_dir_behind(tmp_path, capsys):
    """#1 (guard, passes before the fix too): taking the lock leaves no out_dir behind when the run fails before writing."""
    out = tmp_path / "a" / "run"
    proc = cli(capsys, train.main, [f"run.out_dir={out}", "data.name=cifar10", f"data.root={tmp_path / 'none'}"])
    assert_user_error(proc, "cifar10 not found")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_lock_of_a_killed_process_does_not_block(tmp_path):
    """#1: kill -9 of the holder releases the out_dir (the kernel drops the flock)."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"from distcls.run.outputs import RunDirLock; import time; RunDirLock({str(out)!r}).acquire(); "
                               "print('locked', flush=True); time.sleep(120)"], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        from distcls.run.outputs import RunDirLock
        with pytest.raises(UserError, match=f"in use by another distcls run \\(pid {holder.pid} on host"):
            RunDirLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock(out).acquire()  # the stale lock file is still there, and does not block
    assert (out / ".distcls.lock").read_text().startswith(f"pid {os.getpid()} ")
    lock.release()


@pytest.mark.slow
def test_two_runs_at_one_out_dir(tmp_path, capsys):
    """#1: a second CLI run while the first trains exits 2 naming it; the log stays one run's log.
    (The second run is this process, through the CLI wrapper: the lock is the other process's.)"""
    out = tmp_path / "run"
    args = [f"run.out_dir={out}", *FAST, "train.epochs=50", "log.every_steps=1"]
    from conftest import distcls_cmd
    first = subprocess.Popen(distcls_cmd("train", args), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not read_jsonl(out / "metrics.jsonl"):  # the first run holds the out_dir (no deadline: a loaded machine is slow)
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.05)
        second = cli(capsys, train.main, args)
        assert first.poll() is None  # still training: the runs overlapped
        assert_user_error(second, f"is in use by another distcls run (pid {first.pid} on host")
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 3
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "epoch_step" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, in order, none twice


# ----------------------------------------------------------------------------- 2. never overwrite on a fresh start


def test_resume_auto_with_every_resumable_checkpoint_damaged_overwrites_nothing(run_copy, capsys):
    """#2: last.pt and every epoch file unreadable, best.pt good: exit 2 naming them; nothing overwritten."""
    ckpts = run_copy / "checkpoints"
    for name in ("last.pt", "epoch_0001.pt", "epoch_0002.pt"):
        CORRUPTIONS["text"](ckpts / name)
    before = {p.name: p.read_bytes() for p in [*ckpts.iterdir(), run_copy / "metrics.jsonl", run_copy / "summary.json"]}
    best_epoch = load_ckpt(ckpts / "best.pt")["epoch"]
    proc = cli(capsys, train.main, [f"run.out_dir={run_copy}", *FAST, *SHORT, "train.epochs=2", "--resume", "auto"])
    line = assert_user_error(proc, "can be resumed from", "last.pt, epoch_0002.pt, epoch_0001.pt are damaged",
                             f"best.pt (epoch {best_epoch}) is intact: pass --resume {ckpts / 'best.pt'}", "nothing was overwritten")
    after = {p.name: p.read_bytes() for p in [*ckpts.iterdir(), run_copy / "metrics.jsonl", run_copy / "summary.json"]}
    assert after == before, line


def test_fresh_start_never_overwrites_a_finished_runs_log(run_copy, capsys):
    """#2: an out_dir holding a run's summary/metrics (checkpoints removed) is not started over."""
    shutil.rmtree(run_copy / "checkpoints")
    before = (run_copy / "metrics.jsonl").read_bytes()
    proc = cli(capsys, train.main, [f"run.out_dir={run_copy}", *FAST, "train.epochs=1"])
    assert_user_error(proc, "already holds summary.json of a run", "nothing was overwritten")
    assert (run_copy / "metrics.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------- 3 + 4. any damage is "corrupt", everywhere


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_damaged_checkpoint_is_a_clear_error_for_evaluate(run_copy, capsys, damage):
    """#3 (text, random bytes) and #4 (a flipped bit fails the zip CRC): exit 2, never a traceback or NaN."""
    path = run_copy / "checkpoints/last.pt"
    CORRUPTIONS[damage](path)
    proc = cli(capsys, evaluate.main, ["--checkpoint", path])
    assert_user_error(proc, f"--checkpoint {path}", "corrupt")
    with pytest.raises(UnreadableCheckpoint):
        load_weights_only(path)


@pytest.mark.parametrize("damage", ["text", "flipped_bit"])
def test_resume_auto_falls_back_past_a_damaged_last_pt(run_copy, damage, capsys):
    """#3/#4: --resume auto skips a damaged last.pt (with a warning) and resumes from the newest intact epoch file."""
    CORRUPTIONS[damage](run_copy / "checkpoints/last.pt")
    summary = train_in_process(run_copy, *SHORT, "train.epochs=3", resume="auto")
    assert summary["resumed_from"]["path"].endswith("epoch_0002.pt") and summary["epochs_completed"] == 3
    assert "skipping unreadable checkpoint" in capsys.readouterr().err
    assert load_ckpt(run_copy / "checkpoints/last.pt")["epoch"] == 3


def test_flipped_bit_is_named_as_a_crc_failure(run_copy):
    """#4: the message says what failed."""
    path = run_copy / "checkpoints/epoch_0001.pt"
    _flip_a_bit(path)
    with pytest.raises(UnreadableCheckpoint, match="fails the archive's CRC-32 check"):
        load_weights_only(path)


# ----------------------------------------------------------------------------- 5. a finished run resumed is a no-op


def test_resuming_a_finished_run_is_a_no_op(run_copy, capsys):
    """#5: no second test record, no file rewritten, and it says so."""
    before = {p: p.read_bytes() for p in [run_copy / "metrics.jsonl", run_copy / "summary.json", run_copy / "checkpoints/last.pt"]}
    proc = cli(capsys, train.main, [f"run.out_dir={run_copy}", *FAST, *SHORT, "train.epochs=2", "--resume", "auto"])
    assert_ok(proc)
    assert "already finished" in proc.stdout and "nothing to do" in proc.stdout
    assert {p: p.read_bytes() for p in before} == before


def test_resume_after_the_final_checkpoint_writes_one_test_record(run_copy):
    """#5: stopped after the final checkpoint and test record but before the summary: one test record."""
    (run_copy / "summary.json").unlink()
    summary = train_in_process(run_copy, *SHORT, "train.epochs=2", resume="auto")
    records = read_jsonl(run_copy / "metrics.jsonl")
    assert [r["split"] for r in records].count("test") == 1
    assert summary["test_acc"] == [r for r in records if r["split"] == "test"][0]["acc"]
    assert json.loads((run_copy / "summary.json").read_text())["epochs_completed"] == 2


# ----------------------------------------------------------------------------- 6. stale temp files


def test_stale_temp_files_of_killed_saves_are_removed(run_copy, capsys):
    """#6: `.last.pt.<random>.tmp` of a kill -9 during a save is removed on the next start; other files stay."""
    ckpts = run_copy / "checkpoints"
    stale = [ckpts / ".last.pt.k3j_x9a1.tmp", ckpts / ".best.pt.4242.link.tmp", run_copy / ".metrics.jsonl.ab12cd34.tmp"]
    kept = [ckpts / "notes.tmp", run_copy / "my.tmp", ckpts / ".keep"]
    for p in stale + kept:
        p.write_bytes(b"x" * 89)
    proc = cli(capsys, train.main, [f"run.out_dir={run_copy}", *FAST, *SHORT, "train.epochs=2", "--resume", "auto"])
    assert_ok(proc)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert "removed" in proc.stderr and ".last.pt.k3j_x9a1.tmp" in proc.stderr


# ----------------------------------------------------------------------------- 7. non-finite floats


FLOAT_KEYS = [path for path, default, _ in config.describe() if isinstance(default, float)] + ["train.clip_grad_norm"]


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_rejected_for_every_float_key(key, value):
    """#7: NaN/inf pass every min/max check, so the schema rejects them itself."""
    with pytest.raises(ConfigError, match=f"config key '{key}' must be a finite number"):
        config.load(None, [f"{key}={value}"])


@pytest.mark.parametrize("override, key", [
    ("data.split=[.nan, 0.1, 0.1]", "data.split"), ("data.std=[.inf, 1, 1]", "data.std"),
    ("data.mean=[0, .nan, 0]", "data.mean"), ("optim.betas=[0.9, .nan]", "optim.betas"),
])
def test_non_finite_numbers_in_lists_are_rejected(override, key):
    """#7"""
    extra = ["data.mean=[0, 0, 0]"] if key == "data.std" else ["data.std=[1, 1, 1]"] if key == "data.mean" else []
    with pytest.raises(ConfigError, match=f"config key '{key}' must be a finite number"):
        config.load(None, [override, *extra])


def test_non_finite_lr_is_a_cli_error(tmp_path, capsys):
    """#7: through the CLI: exit 2 before anything runs (it used to train, then exit 4)."""
    out = tmp_path / "o"
    assert_user_error(cli(capsys, train.main, ["optim.lr=nan", f"run.out_dir={out}"]), "'optim.lr' must be a finite number")
    assert not out.exists()


# ----------------------------------------------------------------------------- 8. unreadable config files


def test_binary_config_file_is_a_clear_error(tmp_path, capsys):
    """#8: UnicodeDecodeError."""
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert_user_error(cli(capsys, train.main, ["--config", f, f"run.out_dir={tmp_path / 'o'}"]), f"config file {f} is not a text file")


def test_unreadable_config_file_is_a_clear_error(tmp_path, monkeypatch):
    """#8: PermissionError (simulated: tests may run as root, for whom chmod 000 does not deny reading)."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 1\n")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match=f"config file {f} cannot be read \\(Permission denied\\)"):
        config.load(str(f))


# ----------------------------------------------------------------------------- 9. plug-ins: builders only; checkpoints choose no code


@pytest.mark.parametrize("override, fragment", [
    ("model.name=os:system", "model.name=os:system: 'system' is a builtin_function_or_method, not a builder function"),
    ("data.name=os:system", "data.name=os:system: 'system' is a builtin_function_or_method, not a builder function"),
    ("model.name=json:dumps", "model.name=json:dumps is not a model builder: it must accept (spec, cfg)"),
    ("model.name=os:sep", "not a builder function"),
])
def test_plugin_path_that_is_not_a_builder_is_never_called(tmp_path, capsys, override, fragment):
    """#9"""
    out = tmp_path / "o"
    assert_user_error(cli(capsys, train.main, [override, f"run.out_dir={out}"]), fragment)
    assert not out.exists()


def test_checkpoint_does_not_choose_code_to_import(run_copy, tmp_path, capsys, monkeypatch):
    """#9: a plug-in name stored in a checkpoint is imported only when the user names it too."""
    marker = tmp_path / "imported"
    (tmp_path / "ckpt_plugin.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from distcls.models.small_cnns import cnn3\n\ndef build(spec, cfg):\n    return cnn3(spec, cfg)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ck = load_ckpt(run_copy / "checkpoints/last.pt")
    ck["config"]["model"]["name"] = "ckpt_plugin:build"
    path = tmp_path / "plugin.pt"
    torch.save(ck, path)
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("L", (8, 8)).save(img)
    for main, args in ((evaluate.main, ["--checkpoint", path]), (predict.main, ["--checkpoint", path, img])):
        assert_user_error(cli(capsys, main, args), "trained with the plug-in model.name=ckpt_plugin:build",
                          "a checkpoint does not choose code to import")
    assert not marker.exists() and "ckpt_plugin" not in sys.modules
    ck["config"]["model"]["name"], ck["config"]["data"]["name"] = "cnn3", "ckpt_plugin:build"
    torch.save(ck, path)
    assert_user_error(cli(capsys, evaluate.main, ["--checkpoint", path]), "trained with the plug-in data.name=ckpt_plugin:build")
    assert not marker.exists() and "ckpt_plugin" not in sys.modules
    ck["config"]["model"]["name"], ck["config"]["data"]["name"] = "ckpt_plugin:build", "digits"
    torch.save(ck, path)
    assert_ok(cli(capsys, predict.main, ["--checkpoint", path, "--override", "model.name=ckpt_plugin:build", img]))
    assert marker.exists()  # named by the user: allowed


# ----------------------------------------------------------------------------- 10. unusable outputs


def _make_out(tmp_path, kind) -> Path:
    out = tmp_path / "run"
    if kind == "out_dir is a file":
        out.write_text("x")
    elif kind == "checkpoints is a file":
        out.mkdir()
        (out / "checkpoints").write_text("x")
    elif kind == "metrics.jsonl is a directory":
        (out / "metrics.jsonl").mkdir(parents=True)
    elif kind == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    return out


@pytest.mark.parametrize("kind, fragment", [
    ("out_dir is a file", "is a file, not a directory"),
    ("checkpoints is a file", "checkpoints is a file, but distcls writes its checkpoints into a directory"),
    ("metrics.jsonl is a directory", "metrics.jsonl is a directory, but distcls writes a file"),
    ("parent is a file", "cannot be created"),
])
def test_unusable_out_dir_fails_before_data_and_model_are_built(tmp_path, capsys, monkeypatch, kind, fragment):
    """#10: checked before the data is read (the data builder must not even be reached)."""
    out = _make_out(tmp_path, kind)
    import distcls.run.components
    monkeypatch.setattr(distcls.run.components, "build_data", lambda cfg: pytest.fail("data was built before the out_dir check"))
    assert_user_error(cli(capsys, train.main, [f"run.out_dir={out}", *FAST]), fragment)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_dir(tmp_path, capsys):
    """#10"""
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert_user_error(cli(capsys, train.main, [f"run.out_dir={out}", *FAST]), "is not writable")
    finally:
        out.chmod(0o700)


# ----------------------------------------------------------------------------- 11. checkpoint structure


@pytest.mark.parametrize("edit, command, fragment", [
    (lambda ck: ck.pop("optimizer"), "resume", "lacks 'optimizer' (needed to resume training)"),
    (lambda ck: ck.pop("config"), "resume", "lacks 'config'"),
    (lambda ck: ck.pop("data_spec"), "evaluate", "lacks 'data_spec'"),
    (lambda ck: ck.pop("config"), "evaluate", "lacks 'config'"),
    (lambda ck: ck.update(version="1"), "evaluate", "its 'version' is '1' (str), not an integer"),
    (lambda ck: ck.update(version=None), "resume", "its 'version' is None (NoneType), not an integer"),
    (lambda ck: ck.update(epoch=2.5), "resume", "its 'epoch' is 2.5 (float), not an integer"),
    (lambda ck: ck["config"].pop("model"), "evaluate", "its 'config' lacks model.name"),
    (lambda ck: ck.update(optimizer={"state": {}}), "resume", "not an optimizer state_dict"),
    (lambda ck: ck.update(rng={}), "resume", "its 'rng' lacks"),
    (lambda ck: ck["data_spec"].update(num_classes="ten"), "evaluate", "its 'data_spec' lacks a positive integer 'num_classes'"),
])
def test_checkpoint_structure_is_validated_in_one_place(run_copy, tmp_path, capsys, edit, command, fragment):
    """#11: a missing or mistyped entry is named; no KeyError/TypeError traceback."""
    ck = load_ckpt(run_copy / "checkpoints/last.pt")
    edit(ck)
    path = tmp_path / "edited.pt"
    torch.save(ck, path)
    if command == "resume":
        proc = cli(capsys, train.main, [f"run.out_dir={tmp_path / 'new'}", *FAST, *SHORT, "train.epochs=3", "--resume", path])
    else:
        proc = cli(capsys, evaluate.main, ["--checkpoint", path])
    assert_user_error(proc, f"{path} is not a usable distcls checkpoint", fragment)


def test_resume_with_another_optimizer_names_it(run_copy, tmp_path, capsys):
    """#11: --resume with another optim.name."""
    proc = cli(capsys, train.main, [f"run.out_dir={tmp_path / 'new'}", *FAST, *SHORT, "train.epochs=3", "optim.name=adamw",
                                    "--resume", run_copy / "checkpoints/last.pt"])
    assert_user_error(proc, "was trained with optim.name=sgd, but the config says optim.name=adamw")


def test_resume_auto_skips_a_checkpoint_lacking_entries(run_copy):
    """#11 + #3: a structurally broken last.pt is skipped like a corrupt one."""
    ck = load_ckpt(run_copy / "checkpoints/last.pt")
    del ck["optimizer"]
    (run_copy / "checkpoints/last.pt").unlink()
    torch.save(ck, run_copy / "checkpoints/last.pt")
    summary = train_in_process(run_copy, *SHORT, "train.epochs=3", resume="auto")
    assert summary["resumed_from"]["path"].endswith("epoch_0002.pt")


# ----------------------------------------------------------------------------- 12. dataset format errors


def _mnist(tmp_path, *overrides):
    from distcls.data import build_data
    return build_data(config.load(None, [f"data.root={tmp_path}", "data.name=mnist", *overrides]))


def test_truncated_mnist_gz_names_the_file(tmp_path):
    """#12"""
    raw = fakedata.write_mnist(tmp_path, compress=True)
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(UserError, match=f"{gz} cannot be read .*truncated or corrupt"):
        _mnist(tmp_path)


def test_idx_header_shorter_than_its_magic_says(tmp_path):
    """#12"""
    raw = fakedata.write_mnist(tmp_path)
    f = raw / "t10k-labels-idx1-ubyte"
    f.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(UserError, match=f"{f} is truncated: its header announces 3 dimensions"):
        _mnist(tmp_path)


def test_mnist_label_out_of_range_names_the_file(tmp_path):
    """#12: it used to fail mid-training with 'Target 200 is out of bounds'."""
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
    """#12"""
    import numpy as np
    from distcls.data import build_data
    folder = fakedata.write_cifar10(tmp_path)
    path = _cifar_batch(folder, "data_batch_2", np.zeros(data_shape, dtype=np.uint8), labels)
    with pytest.raises(UserError) as info:
        build_data(config.load(None, [f"data.root={tmp_path}", "data.name=cifar10"]))
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_plugin_dataset_label_out_of_range_is_caught_at_load(tmp_path, monkeypatch):
    """#12: the same check for any dataset builder (before training starts)."""
    (tmp_path / "bad_labels.py").write_text(
        "import torch\nfrom distcls.data import RawDataset, TensorSource\n"
        "def build(cfg):\n    src = TensorSource(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(20) % 3 + (torch.arange(20) == 7) * 50)\n"
        "    return RawDataset(train=src, test=src, class_names=['a', 'b', 'c'], mean=(0.5,), std=(0.5,))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from distcls.data import build_data
    with pytest.raises(UserError, match="the train split holds label 51, but the dataset has 3 classes"):
        build_data(config.load(None, ["data.name=bad_labels:build"]))


# ----------------------------------------------------------------------------- 13. more tracebacks


def test_huge_seed_is_a_config_error():
    """#13: run.seed=1e20 (as an integer) overflowed inside numpy/torch."""
    with pytest.raises(ConfigError, match="'run.seed' must be <= 4294967295"):
        config.load(None, ["run.seed=100000000000000000000"])


def test_negative_model_width_is_a_user_error(tmp_path, capsys):
    """#13: model.args.width=-4."""
    assert_user_error(cli(capsys, train.main, ["model.args.width=-4", f"run.out_dir={tmp_path / 'o'}"]),
                      "model.name=cnn3 cannot be built with model.args={'width': -4}", "negative dimension")


@pytest.mark.parametrize("env", [
    {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "abc", "SLURM_LOCALID": "0"},
])
def test_bad_slurm_ntasks_is_a_user_error(monkeypatch, env):
    """#13"""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match="environment variable SLURM_NTASKS='abc' is not an integer"):
        dist.detect()


def test_bad_restart_count_is_a_user_error(tmp_path, capsys, monkeypatch):
    """#13: TORCHELASTIC_RESTART_COUNT=abc."""
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "abc")
    out = tmp_path / "o"
    assert_user_error(cli(capsys, train.main, [f"run.out_dir={out}", *FAST]), "TORCHELASTIC_RESTART_COUNT='abc' is not an integer")
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_evaluate_samples_must_be_positive(trained, capsys, value):
    """#13: --samples 0 crashed in the plot, --samples -3 was accepted."""
    proc = cli(capsys, evaluate.main, ["--checkpoint", trained / "checkpoints/last.pt", "--samples", value])
    assert_user_error(proc, "argument --samples")


# ----------------------------------------------------------------------------- 17. interval records across a resume


def test_interval_record_after_a_mid_epoch_resume_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """#17: the checkpoint carries the log interval's running sums."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    args = ["model.name=stop_model:build", "log.every_steps=4", "train.epochs=1", "train.max_steps_per_epoch=14"]
    train_in_process(tmp_path / "ref", *args)
    out = tmp_path / "stopped"
    from distcls.run.runner import Stopped
    stopped = run_in_process(out, *args, "model.args.stop_at=10")  # SIGTERM in step 10: saved at epoch_step 10
    assert isinstance(stopped, Stopped) and stopped.signal_name == "SIGTERM"
    assert load_ckpt(out / "checkpoints/last.pt")["epoch_step"] == 10
    train_in_process(out, *args, resume="auto")

    def intervals(run):
        return [(r["step"], r["loss"], r["acc"]) for r in read_jsonl(run / "metrics.jsonl") if "epoch_step" in r]

    ref, resumed = intervals(tmp_path / "ref"), intervals(out)
    assert [r[0] for r in ref] == [4, 8, 12] and [r[0] for r in resumed] == [4, 8, 12]
    assert resumed == ref  # the record at step 12 covers steps 9-12, across the checkpoint at step 10


def _stop_in_first_validation(tmp_path, monkeypatch, epochs):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    args = ["model.name=stop_model:build", f"train.epochs={epochs}", "train.max_steps_per_epoch=5"]
    from distcls.run.runner import Stopped
    out = tmp_path / "run"
    stopped = run_in_process(out, *args, "model.args.stop_at_eval=2")  # SIGTERM in epoch 1's first validation batch
    assert isinstance(stopped, Stopped) and stopped.signal_name == "SIGTERM"
    ck = load_ckpt(out / "checkpoints/last.pt")
    assert (ck["epoch"], ck["epoch_step"], ck["step"]) == (1, 0, 5)  # saved at that epoch's end, not a step later
    return train_in_process(out, *args, resume="auto")


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_signal_during_validation_stops_at_that_epochs_end(tmp_path, monkeypatch, epochs):
    """A stop signal that arrives while the epoch end evaluates is agreed there (one explicit
    all-reduce per epoch): the run saves at that epoch's end and exits 3, also after its last epoch."""
    summary = _stop_in_first_validation(tmp_path, monkeypatch, epochs)
    assert summary["epochs_completed"] == epochs and summary["global_step"] == 5 * epochs


# ----------------------------------------------------------------------------- 18. options and overrides in any order


def test_options_and_overrides_in_any_order():
    """#18: `run.out_dir=X --config F data.root=Y` used to say 'unrecognized arguments: data.root=Y'."""
    args = train.parse_args(["run.out_dir=X", "--config", "F", "data.root=Y", "--resume", "auto", "train.epochs=1"])
    assert args.config == "F" and args.resume == "auto" and args.overrides == ["run.out_dir=X", "data.root=Y", "train.epochs=1"]
    args = evaluate.parse_args(["data.root=Y", "--checkpoint", "c.pt", "data.name=mnist", "--split", "val"])
    assert args.checkpoint == "c.pt" and args.split == "val" and args.overrides == ["data.root=Y", "data.name=mnist"]
    args = predict.parse_args(["a.png", "--checkpoint", "c.pt", "b.png", "--top-k", "2"])
    assert args.images == ["a.png", "b.png"] and args.top_k == 2


def test_intermixed_overrides_reach_the_run(tmp_path, capsys):
    """#18: through the CLI, an override after --config is applied (here: a user error from it)."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 1\n")
    proc = cli(capsys, train.main, [f"run.out_dir={tmp_path / 'o'}", "--config", f, "optim.lr=-1"])
    assert_user_error(proc, "'optim.lr' must be > 0")
