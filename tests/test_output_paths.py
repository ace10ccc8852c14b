"""Where a run and the commands write: one run per out_dir at a time (the lock names its holder and dies
with it), nothing left behind by a run that fails first, and an output that cannot be written (an
unusable or read-only out_dir, a name too long, evaluate's --out-dir, plot's folder, bench --out)
refused in one line before any data or model is built."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, ROOT, assert_user_error, child_env, cli_in_process

from distcls import config, evaluate, plot, train
from distcls.errors import UserError
from distcls.runtime import dist
from distcls.tracking.metrics import read_jsonl

LONG = "x" * 300  # a path component over the 255 bytes a name can have




@pytest.fixture
def no_work(monkeypatch):
    """The evaluation must not start: a bad output is refused first."""
    def fail(*a, **k):
        pytest.fail("the data was built before the output path was checked")
    monkeypatch.setattr(evaluate, "build_data", fail)
    monkeypatch.setattr(plot, "test_pictures", fail)


def test_evaluate_out_dir_that_cannot_be_written_is_refused_first(finished_run, tmp_path, capsys, no_work):
    ckpt = finished_run / "checkpoints/last.pt"
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file", "is a file, not a directory"), (tmp_path / "file" / "eval", "cannot be created: "),
             (tmp_path / LONG, "is 300 bytes long; a file or directory name has at most 255")]
    for out_dir, fragment in cases:
        assert_user_error(
            cli_in_process(capsys, evaluate.main, ["--checkpoint", ckpt, "--out-dir", out_dir]), "--out-dir", fragment
        )


def test_plot_refuses_an_unwritable_plots_folder_and_another_runs_checkpoint(finished_run, tmp_path, capsys, no_work):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    shutil.rmtree(copy / "plots", ignore_errors=True)
    (copy / "plots").write_text("a file where the plots go")
    assert_user_error(cli_in_process(capsys, plot.main, [copy]), "the plots folder", "is a file, not a directory")
    (copy / "plots").unlink()
    other = finished_run / "checkpoints/last.pt"
    assert_user_error(cli_in_process(capsys, plot.main, [copy, "--checkpoint", other]),
                      f"--checkpoint {other} is not one of {copy}'s checkpoints", "evaluate --checkpoint")
    assert not (copy / "plots").exists()  # nothing was overwritten


def test_run_out_dir_with_a_name_too_long_is_one_line(tmp_path, capsys):
    """`run.out_dir=runs/<300 x>` ended in an OSError traceback."""
    (tmp_path / "runs").mkdir()
    out = tmp_path / "runs" / LONG
    assert_user_error(
        cli_in_process(capsys, train.main, [f"run.out_dir={out}", *FAST]), "is 300 bytes long", "run.out_dir"
    )
    assert_user_error(cli_in_process(capsys, train.main, [f"run.out_dir={out}/sub", *FAST]), "is 300 bytes long")


def test_bench_refuses_a_directory_as_out_and_a_bad_override(tmp_path, capsys, monkeypatch):
    """`bench --out DIR` failed after the measurement; `bench throughput` with a bad
    override ended in a CalledProcessError traceback. Both are now refused before any training
    starts; a training child that fails is reported in its own one line."""
    from distcls.bench import throughput
    from distcls.bench.__main__ import main as bench_main

    started, run_train = [], throughput.run_train
    monkeypatch.setattr(throughput, "run_train", lambda *a, **k: started.append(a) or run_train(*a, **k))
    assert_user_error(
        cli_in_process(capsys, bench_main, ["throughput", "--epochs", "1", "--out", tmp_path, "train.epochs=1"]),
        f"--out {tmp_path} is a directory",
    )
    assert_user_error(
        cli_in_process(capsys, bench_main, ["throughput", "--epochs", "1", "optim.lr=abc"]),
        "optim.lr",
        "must be a number",
    )
    assert started == []  # neither started a training process
    assert_user_error(
        cli_in_process(
            capsys,
            bench_main,
            ["throughput", "--epochs", "1", "data.name=imagefolder", f"data.root={tmp_path / 'none'}"],
        ),
        "distcls.train (1 process) exited 2",
        "imagefolder root",
    )
    assert len(started) == 1  # the child's own error, in the bench's one line


def test_second_run_at_an_out_dir_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    """A second run at an out_dir in use exits 2 naming the holder; released, the out_dir is usable."""
    out = tmp_path / "run"
    cfg = config.load(None, [f"run.out_dir={out}", *FAST, "train.epochs=1"])
    from distcls.run.runner import TrainingRun
    first = TrainingRun(cfg, dist.detect())
    try:
        proc = cli_in_process(capsys, train.main, [f"run.out_dir={out}", *FAST, "train.epochs=1"])
        assert_user_error(
            proc,
            f"run.out_dir={out} is in use by another distcls run (pid {os.getpid()} on host",
            "choose another run.out_dir",
        )
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        first.close()
    second = TrainingRun(cfg, dist.detect())  # released: the next run may take it
    second.close()


def test_failed_run_leaves_no_out_dir_behind(tmp_path, capsys):
    """Taking the lock leaves no out_dir behind when the run fails before writing."""
    out = tmp_path / "a" / "run"
    proc = cli_in_process(
        capsys, train.main, [f"run.out_dir={out}", "data.name=cifar10", f"data.root={tmp_path / 'none'}"]
    )
    assert_user_error(proc, "cifar10 not found")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_lock_of_a_killed_process_does_not_block(tmp_path):
    """Kill -9 of the holder releases the out_dir (the kernel drops the flock)."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from distcls.run.outputs import RunDirLock; import time; RunDirLock({str(out)!r}).acquire(); "
            "print('locked', flush=True); time.sleep(120)",
        ],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
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
    """A second CLI run while the first trains exits 2 naming it; the log stays one run's log.
    (The second run is this process, through the CLI wrapper: the lock is the other process's.)"""
    out = tmp_path / "run"
    args = [f"run.out_dir={out}", *FAST, "train.epochs=50", "log.every_steps=1"]
    from conftest import distcls_cmd

    first = subprocess.Popen(
        distcls_cmd("train", args), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # the first run holds the out_dir (no deadline: a loaded machine is slow)
        while not read_jsonl(out / "metrics.jsonl"):
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.05)
        second = cli_in_process(capsys, train.main, args)
        assert first.poll() is None  # still training: the runs overlapped
        assert_user_error(second, f"is in use by another distcls run (pid {first.pid} on host")
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 3
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "epoch_step" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, in order, none twice




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
    """Checked before the data is read (the data builder must not even be reached)."""
    out = _make_out(tmp_path, kind)
    import distcls.run.components

    monkeypatch.setattr(
        distcls.run.components, "build_data", lambda cfg: pytest.fail("data was built before the out_dir check")
    )
    assert_user_error(cli_in_process(capsys, train.main, [f"run.out_dir={out}", *FAST]), fragment)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_dir(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert_user_error(cli_in_process(capsys, train.main, [f"run.out_dir={out}", *FAST]), "is not writable")
    finally:
        out.chmod(0o700)
