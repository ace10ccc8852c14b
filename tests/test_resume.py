"""Checkpoints, exact resume and fault tolerance: nothing is lost when a process dies."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    FAST, ROOT, assert_ok, assert_user_error, child_env, child_pids, cli_in_process, distcls_cmd, kill_process_tree,
    load_ckpt, max_weight_diff, run_distcls, train_in_process,
)
from distcls import evaluate, predict, train
from distcls.tracking.metrics import read_jsonl

TESTS = Path(__file__).parent

pytestmark = pytest.mark.slow  # multi-process runs, signals and kill -9

# 115 steps per epoch with a record (and fsync) per step: the runs stopped from outside pause at the
# record of the step the test chose (tests/pause_hook). Two epochs: a stop before and one after an
# epoch boundary, and resumes that cross one.
LONG = ["data.name=synthetic", "data.synthetic.train_samples=2048", "data.synthetic.size=16", "data.batch_size=16",
        "model.args.width=16", "optim.lr=0.01", "train.epochs=2", "log.every_steps=1", "log.plots=false",
        "train.ema.enabled=true", "train.ema.every_steps=3", "train.ema.decay=0.9"]  # the model EMA resumes exactly too
STEPS_PER_EPOCH = 2048 * 9 // 10 // 16  # 115: val_fraction 0.1 of the synthetic train set


PAUSE_HOOK = TESTS / "pause_hook"  # its sitecustomize.py holds rank 0 at a chosen step until the test lets it go


@pytest.fixture
def paused_run(tmp_path):
    """Start `python -m distcls.train` (under torchrun when nproc > 1) that pauses after its train record
    of (epoch, epoch_step) until the test lets it go (tests/pause_hook): the test's signal or kill lands
    at that step whatever the machine's load. Every process still running at the test's end is killed."""
    started = []

    def start(args, epoch: int, epoch_step: int, nproc: int = 1, torchrun_args=()) -> "PausedRun":
        gate = tmp_path / f"gate{len(started)}"
        env = child_env({"PYTHONPATH": os.pathsep.join([str(PAUSE_HOOK), str(ROOT)]),
                         "DISTCLS_TEST_PAUSE_AT": f"{epoch}:{epoch_step}", "DISTCLS_TEST_PAUSE_GATE": str(gate)})
        proc = subprocess.Popen(distcls_cmd("train", [str(a) for a in args], nproc, torchrun_args), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return PausedRun(proc, gate, epoch, epoch_step)

    yield start
    for proc in started:
        kill_process_tree(proc)  # the run and, under torchrun, its workers


class PausedRun:
    def __init__(self, proc: subprocess.Popen, gate: Path, epoch: int, epoch_step: int):
        self.proc, self.gate, self.epoch, self.epoch_step = proc, gate, epoch, epoch_step

    def wait_for_the_pause(self, out: Path) -> dict:
        """The train record at the pause (rank 0 waits there). No deadline of its own: a loaded machine
        may be slow, and a run that ends or hangs ends the wait (poll / pytest)."""
        while True:
            assert self.proc.poll() is None, (
                f"finished before its pause (exit {self.proc.returncode}): {self.proc.stderr.read()[-3000:]}"
            )
            for r in read_jsonl(out / "metrics.jsonl"):
                if r.get("split") == "train" and (r.get("epoch"), r.get("epoch_step")) == (self.epoch, self.epoch_step):
                    return r
            time.sleep(0.02)

    def go_on(self) -> tuple:
        """Let the run go on from its pause; its stdout, stderr once it ends."""
        self.gate.touch()
        stdout, stderr = self.proc.communicate(timeout=600)
        assert "Error in sitecustomize" not in stderr, stderr  # (python runs on without a broken hook)
        return stdout, stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run every single-process variant must match bitwise (in this
    process, on one thread: bitwise the run `python -m distcls.train` makes, see tests/conftest.py)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train_in_process(out, *LONG, "checkpoint.keep=5")
    return out


def test_checkpoint_contents_load_weights_only(reference):
    ck = load_ckpt(reference / "checkpoints/last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "best_metric", "config", "rng", "version",
            "epoch_step", "data_spec"} <= ck.keys()
    assert ck["epoch"] == 2 and ck["step"] == 2 * STEPS_PER_EPOCH and ck["epoch_step"] == 0
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert {"python", "numpy", "torch", "cuda"} <= ck["rng"].keys()
    files = sorted(p.name for p in (reference / "checkpoints").glob("*.pt"))
    assert files == ["best.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt"]
    assert not list((reference / "checkpoints").glob(".*tmp"))  # no temp files left behind


def test_resume_after_epoch_is_bitwise_identical(reference, tmp_path):
    out = tmp_path / "resumed"
    train_in_process(out, *LONG, resume=str(reference / "checkpoints/epoch_0001.pt"))
    a, b = load_ckpt(reference / "checkpoints/last.pt"), load_ckpt(out / "checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(
        torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values())
    )
    assert a["ema"]["updates"] == b["ema"]["updates"] and all(
        torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k]) for k in a["model"]
    )


def _stop(paused_run, out: Path, sig: signal.Signals, epoch: int, *resume) -> dict:
    """`python -m distcls.train` (a fresh start, or `resume`) stopped by `sig` at step 10 of `epoch`:
    exit 3 with the one line that says how to resume; the checkpoint it saved."""
    run = paused_run([f"run.out_dir={out}", *LONG, *resume], epoch=epoch, epoch_step=10)
    run.wait_for_the_pause(out)
    run.proc.send_signal(sig)
    stdout, stderr = run.go_on()
    assert run.proc.returncode == 3, stderr
    assert f"distcls: stopped: stopped by {sig.name}" in stderr and "--resume auto" in stderr
    return load_ckpt(out / "checkpoints/last.pt")


def test_stop_signals_mid_epoch_then_resume_is_bitwise_identical(reference, tmp_path, paused_run):
    """SIGTERM (preemption / scancel) in epoch 1, before any epoch boundary; the resumed process
    crosses the boundary and SIGINT (Ctrl-C on a terminal) stops it in epoch 2; the second resume
    (in this process) finishes bitwise as the uninterrupted run."""
    out = tmp_path / "run"
    ck = _stop(paused_run, out, signal.SIGTERM, 1)
    assert ck["epoch"] == 0 and ck["epoch_step"] == 11  # mid-epoch: the step after the signal, exactly
    ck = _stop(paused_run, out, signal.SIGINT, 2, "--resume", "auto")
    assert ck["epoch"] == 1 and ck["epoch_step"] == 11
    assert train_in_process(out, *LONG, resume="auto")["resumed_from"]["step"] == STEPS_PER_EPOCH + ck["epoch_step"]
    a, b = load_ckpt(reference / "checkpoints/last.pt"), load_ckpt(out / "checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k]) for k in a["model"])  # and the model EMA
    # the resumed runs' log reads like one run: one record per step, no duplicates
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train" and "epoch_step" in r]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))


# Half the samples: a 2-rank step costs more than a single process's.
TWO_RANK = [*LONG, "data.synthetic.train_samples=1024", "checkpoint.every_steps=20"]
TWO_RANK_STEPS_PER_EPOCH = 1024 * 9 // 10 // 16  # 57


@pytest.fixture(scope="module")
def reference2(tmp_path_factory):
    """The uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("ref2") / "run"
    assert_ok(run_distcls("train", [f"run.out_dir={out}", *TWO_RANK], nproc=2))
    return out


def _worker_pid(torchrun: subprocess.Popen, rank: int) -> int:
    children = child_pids(torchrun.pid)
    found = [
        p for p in children if f"\x00RANK={rank}\x00".encode() in b"\x00" + Path(f"/proc/{p}/environ").read_bytes()
    ]
    assert len(found) == 1, children
    return found[0]


def test_kill_9_worker_under_torchrun_restarts_and_matches_uninterrupted(reference2, tmp_path, paused_run):
    out = tmp_path / "killed"
    run = paused_run(
        [f"run.out_dir={out}", *TWO_RANK], epoch=1, epoch_step=45, nproc=2, torchrun_args=["--max-restarts=2"]
    )
    run.wait_for_the_pause(out)
    os.kill(_worker_pid(run.proc, 1), signal.SIGKILL)
    stdout, stderr = run.go_on()
    assert run.proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # restarted from the step checkpoint
    assert summary["resumed_from"] is not None and summary["resumed_from"]["step"] == 40
    a, b = load_ckpt(reference2 / "checkpoints/last.pt"), load_ckpt(out / "checkpoints/last.pt")
    assert max_weight_diff(a["model"], b["model"]) == 0.0
    assert max_weight_diff(a["ema"]["weights"], b["ema"]["weights"]) == 0.0


def test_signal_to_one_rank_stops_all_ranks_then_resume_is_exact(reference2, tmp_path, paused_run):
    out = tmp_path / "usr1"
    run = paused_run([f"run.out_dir={out}", *TWO_RANK], epoch=2, epoch_step=5, nproc=2)
    run.wait_for_the_pause(out)
    os.kill(_worker_pid(run.proc, 1), signal.SIGUSR1)  # SLURM's warning signal, delivered to one task only
    stdout, stderr = run.go_on()
    assert (
        run.proc.returncode != 0
        and "stopped by a stop signal on another rank" in stderr
        and "stopped by SIGUSR1" in stderr
    )
    ck = load_ckpt(out / "checkpoints/last.pt")
    # rank 1 got the signal inside step 6's gradient all-reduce (waiting for the paused rank 0): step 6 agreed it
    assert ck["epoch"] == 1 and ck["epoch_step"] == 6
    assert_ok(run_distcls("train", [f"run.out_dir={out}", *TWO_RANK, "--resume", "auto"], nproc=2))
    a, b = load_ckpt(reference2 / "checkpoints/last.pt"), load_ckpt(out / "checkpoints/last.pt")
    assert max_weight_diff(a["model"], b["model"]) == 0.0
    assert max_weight_diff(a["ema"]["weights"], b["ema"]["weights"]) == 0.0
    # Both ranks restored the EMA (each evaluates its shard of val/test with its own): the EMA's
    # numbers equal the uninterrupted run's, not only rank 0's saved weights.
    ema = {
        run: [
            (r["split"], r["ema_loss"], r["ema_acc"])
            for r in read_jsonl(run / "metrics.jsonl")
            if r["split"] in ("val", "test")
        ]
        for run in (reference2, out)
    }
    assert ema[out] == ema[reference2] and len(ema[out]) == 3


def test_resume_at_a_different_world_size(reference2, tmp_path, capsys):
    one = tmp_path / "one"
    capsys.readouterr()
    train_in_process(one, *TWO_RANK, resume=str(reference2 / "checkpoints/epoch_0001.pt"))
    a, b = load_ckpt(reference2 / "checkpoints/last.pt"), load_ckpt(one / "checkpoints/last.pt")
    assert b["world_size"] == 1 and a["world_size"] == 2
    assert max_weight_diff(a["model"], b["model"]) <= 1e-5
    out = capsys.readouterr()
    assert "saved at world size 2; resuming at world size 1" in out.out + out.err  # said in the log


def test_truncated_last_falls_back_to_previous_checkpoint(reference, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints/epoch_0001.pt").write_bytes((reference / "checkpoints/epoch_0001.pt").read_bytes())
    last = out / "checkpoints/last.pt"  # the newest save was torn (e.g. a full disk, a copy cut short)
    full = (reference / "checkpoints/epoch_0002.pt").read_bytes()
    last.write_bytes(full[: len(full) // 2])
    capsys.readouterr()
    summary = train_in_process(out, *LONG, resume="auto")
    err = capsys.readouterr().err
    assert "skipping unreadable checkpoint" in err and "last.pt is truncated or corrupt" in err
    assert summary["resumed_from"]["path"].endswith("epoch_0001.pt")
    a, b = load_ckpt(reference / "checkpoints/last.pt"), load_ckpt(last)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path, capfd):
    out = tmp_path / "run"
    # The 2nd write of last.pt (epoch 2's save) dies with half its bytes on disk, before the rename;
    # every other atomic write (config.yaml, metrics.jsonl, summary.json, links) goes through untouched.
    args = [
        f"run.out_dir={out}", *FAST, "train.epochs=3", "train.max_steps_per_epoch=4", "data.val_fraction=0",
        "checkpoint.keep=0",
    ]
    script = f"""
import os, sys
from distcls import train
from distcls.runtime import atomic_files
from distcls.cli import run_cli
writes_of_last = []
def machine_dies_mid_write(stage, path, tmp):
    if stage == "written" and path.name == "last.pt":
        writes_of_last.append(path)
        if len(writes_of_last) == 2:
            os.truncate(tmp, tmp.stat().st_size // 2)  # the torn temp file a dying machine leaves
            os._exit(9)
with atomic_files.inject_fault(machine_dies_mid_write):
    code = run_cli(train.main, {args!r})
sys.exit(code)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 9
    ck = load_ckpt(out / "checkpoints/last.pt")  # the previous save is intact
    assert ck["epoch"] == 1
    torn = list((out / "checkpoints").glob(".last.pt.*.tmp"))  # the torn temp file, never renamed
    assert len(torn) == 1 and torn[0].stat().st_size < (out / "checkpoints/last.pt").stat().st_size
    # the next run (in this process) resumes from it
    resumed = cli_in_process(capfd, train.main, [*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"removed {torn[0]}: the temp file of a save that was killed" in resumed.stderr and not torn[0].exists()
    assert load_ckpt(out / "checkpoints/last.pt")["epoch"] == 3


def test_malicious_checkpoint_is_refused_everywhere(tmp_path, capfd):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "version": 1}, evil)
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)
    for main, args in ((train.main, ["--resume", evil, f"run.out_dir={tmp_path / 'o'}"]),
                       (evaluate.main, ["--checkpoint", evil]), (predict.main, ["--checkpoint", evil, img])):
        proc = cli_in_process(capfd, main, args)  # in this process: unpickling the file here would run its code here
        assert_user_error(proc, "refusing to load", "arbitrary unpickling")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_out_dir_of_another_run_is_not_overwritten(tmp_path, capsys):
    from distcls.cli import run_cli
    from distcls import train

    out = tmp_path / "run"
    train_in_process(out, "train.epochs=1")
    before = (out / "checkpoints/last.pt").read_bytes()
    capsys.readouterr()
    code = run_cli(train.main, [f"run.out_dir={out}", "train.epochs=1"])
    err = capsys.readouterr().err
    assert code == 2 and "already holds checkpoints" in err and "--resume auto" in err
    assert (out / "checkpoints/last.pt").read_bytes() == before
    code = run_cli(train.main, [f"run.out_dir={out}", "model.name=cnn2", "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and "trained with model.name=cnn3" in err
    code = run_cli(train.main, [f"run.out_dir={out}", "data.image_size=16", "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and "expects image_size=8, but this data gives image_size=16" in err
    code = run_cli(train.main, [f"run.out_dir={out}", "model.args.width=8", "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the model" in err and "differ in shape" in err


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    summary = train_in_process(tmp_path / "fresh", "train.epochs=1", resume="auto")
    assert summary["resumed_from"] is None and summary["epochs_completed"] == 1


def _check_one_skipped_step(out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    ck = load_ckpt(out / "checkpoints/last.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


NAN_SKIP = [
    *FAST, "model.name=nan_model:build", "train.nonfinite=skip", "train.epochs=1", "train.max_steps_per_epoch=6",
]


def test_nonfinite_loss_skip_in_one_process(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    train_in_process(tmp_path / "skip", *NAN_SKIP, "model.args.nan_rank=0")
    _check_one_skipped_step(tmp_path / "skip")


def test_nonfinite_loss_skip_is_agreed_by_all_ranks(tmp_path):
    out = tmp_path / "skip"
    # NaN on rank 1 only: rank 0 skips the step too
    proc = run_distcls("train", [f"run.out_dir={out}", *NAN_SKIP, "model.args.nan_rank=1"], nproc=2,
                       env={"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"})
    assert_ok(proc)
    _check_one_skipped_step(out)


def test_nonfinite_loss_abort_exits_4(tmp_path, capfd, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "abort"
    proc = cli_in_process(
        capfd, train.main, [f"run.out_dir={out}", *FAST, "model.name=nan_model:build", "train.nonfinite=abort"]
    )
    assert proc.returncode == 4
    assert "non-finite loss at epoch 1, step 3" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_to_the_nproc_per_node_launcher_stops_every_rank_at_a_checkpoint(tmp_path):
    """`python -m distcls.train --nproc_per_node 2`: a stop signal sent to the launcher itself (the ranks lead sessions
    of their own) reaches the ranks, which save a mid-epoch checkpoint; the launcher exits 128 + the signal, no
    traceback."""
    out = tmp_path / "run"
    gate = tmp_path / "gate"
    env = child_env({"PYTHONPATH": os.pathsep.join([str(PAUSE_HOOK), str(ROOT)]), "DISTCLS_TEST_PAUSE_AT": "1:5",
                     "DISTCLS_TEST_PAUSE_GATE": str(gate)})
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "distcls.train", "--nproc_per_node", "2", f"run.out_dir={out}", *FAST, *TWO_RANK,
            "dist.device=cpu",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = PausedRun(proc, gate, 1, 5)
    try:
        run.wait_for_the_pause(out)
        proc.send_signal(signal.SIGTERM)  # to the launcher, not to a rank
        _, stderr = run.go_on()
    finally:
        kill_process_tree(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr
    ck = load_ckpt(out / "checkpoints/last.pt")
    # saved mid-epoch, where the ranks stopped
    assert ck["epoch"] == 0 and 5 <= ck["epoch_step"] < TWO_RANK_STEPS_PER_EPOCH


def test_sigterm_mid_epoch_on_shards_then_resume_is_bitwise_identical(tmp_path, paused_run):
    """WebDataset shards read by a DataLoader worker: stopped at step 2 of epoch 1 (its streams inside
    their shuffle windows), resumed: bitwise the run never stopped."""
    from fakedata import write_imagefolder, write_shards

    shards = write_shards(
        write_imagefolder(tmp_path / "folder", classes=("a", "b", "c", "d"), per_class=40, size=24, layout="split"),
        tmp_path / "shards",
    )
    args = [
        *FAST, "data.name=webdataset", f"data.train_shards={shards}/train-{{000000..000006}}.tar",
        f"data.val_shards={shards}/val-{{000000..000003}}.tar", "data.image_size=16", "data.shard_streams=4",
        "data.shuffle_window=16", "data.augment.random_resized_crop=true", "data.augment.hflip=true",
        "data.num_workers=1", "model.name=cnn3", "train.epochs=2", "log.every_steps=1",
    ]
    train_in_process(tmp_path / "ref", *args)
    out = tmp_path / "run"
    run = paused_run([f"run.out_dir={out}", "dist.device=cpu", *args], epoch=1, epoch_step=2)
    run.wait_for_the_pause(out)
    run.proc.send_signal(signal.SIGTERM)
    stdout, stderr = run.go_on()
    assert run.proc.returncode == 3, stderr
    assert load_ckpt(out / "checkpoints/last.pt")["epoch_step"] == 3
    train_in_process(out, *args, resume="auto")
    a, b = load_ckpt(tmp_path / "ref/checkpoints/last.pt"), load_ckpt(out / "checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
