"""Outputs that cannot be written are refused before the work, in one line (issue 19 #9, #10, #15, #19)."""
import subprocess

import pytest

from conftest import FAST, assert_user_error, train_in_process
from distcls import evaluate, plot, train
from distcls.cli import run_cli

LONG = "x" * 300  # a path component over the 255 bytes a name can have


def cli(capsys, main, args) -> subprocess.CompletedProcess:
    capsys.readouterr()
    code = run_cli(main, [str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paths") / "run"
    train_in_process(out, "train.epochs=1", "train.max_steps_per_epoch=3")
    return out


@pytest.fixture
def no_work(monkeypatch):
    """The evaluation must not start: a bad output is refused first."""
    def fail(*a, **k):
        pytest.fail("the data was built before the output path was checked")
    monkeypatch.setattr(evaluate, "build_data", fail)
    monkeypatch.setattr(plot, "test_pictures", fail)


def test_evaluate_out_dir_that_cannot_be_written_is_refused_first(run, tmp_path, capsys, no_work):
    ckpt = run / "checkpoints/last.pt"
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file", "is a file, not a directory"), (tmp_path / "file" / "eval", "cannot be created: "),
             (tmp_path / LONG, "is 300 bytes long; a file or directory name has at most 255")]
    for out_dir, fragment in cases:
        assert_user_error(cli(capsys, evaluate.main, ["--checkpoint", ckpt, "--out-dir", out_dir]), "--out-dir", fragment)


def test_plot_refuses_an_unwritable_plots_folder_and_another_runs_checkpoint(run, tmp_path, capsys, no_work):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "plots", ignore_errors=True)
    (copy / "plots").write_text("a file where the plots go")
    assert_user_error(cli(capsys, plot.main, [copy]), "the plots folder", "is a file, not a directory")
    (copy / "plots").unlink()
    other = run / "checkpoints/last.pt"
    assert_user_error(cli(capsys, plot.main, [copy, "--checkpoint", other]),
                      f"--checkpoint {other} is not one of {copy}'s checkpoints", "evaluate --checkpoint")
    assert not (copy / "plots").exists()  # nothing was overwritten


def test_run_out_dir_with_a_name_too_long_is_one_line(tmp_path, capsys):
    """#10: `run.out_dir=runs/<300 x>` ended in an OSError traceback."""
    (tmp_path / "runs").mkdir()
    out = tmp_path / "runs" / LONG
    assert_user_error(cli(capsys, train.main, [f"run.out_dir={out}", *FAST]), "is 300 bytes long", "run.out_dir")
    assert_user_error(cli(capsys, train.main, [f"run.out_dir={out}/sub", *FAST]), "is 300 bytes long")


def test_bench_refuses_a_directory_as_out_and_a_bad_override(tmp_path, capsys, monkeypatch):
    """#9 and #15: `bench --out DIR` failed after the measurement; `bench throughput` with a bad
    override ended in a CalledProcessError traceback. Both are now refused before any training
    starts; a training child that fails is reported in its own one line."""
    from distcls.bench import throughput
    from distcls.bench.__main__ import main as bench_main

    started, run_train = [], throughput.run_train
    monkeypatch.setattr(throughput, "run_train", lambda *a, **k: started.append(a) or run_train(*a, **k))
    assert_user_error(cli(capsys, bench_main, ["throughput", "--epochs", "1", "--out", tmp_path, "train.epochs=1"]),
                      f"--out {tmp_path} is a directory")
    assert_user_error(cli(capsys, bench_main, ["throughput", "--epochs", "1", "optim.lr=abc"]), "optim.lr", "must be a number")
    assert started == []  # neither started a training process
    assert_user_error(cli(capsys, bench_main, ["throughput", "--epochs", "1", "data.name=imagefolder", f"data.root={tmp_path / 'none'}"]),
                      "distcls.train (1 process) exited 2", "imagefolder root")
    assert len(started) == 1  # the child's own error, in the bench's one line
