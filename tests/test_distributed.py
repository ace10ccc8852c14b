"""Guarantees across world sizes, with real gloo process groups (torchrun, 2 ranks)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, ROOT, assert_ok, child_env, load_ckpt, max_weight_diff, run_distcls, train_in_process
from distcls import evaluate
from distcls.cli import run_cli

pytestmark = pytest.mark.slow  # multi-process runs, signals and kill -9


def _train(out, nproc, *overrides):
    proc = run_distcls("train", [f"run.out_dir={out}", *FAST, *overrides], nproc=nproc)
    assert_ok(proc)
    return load_ckpt(out / "checkpoints/last.pt"), json.loads((out / "summary.json").read_text())


def test_world_size_invariance_lenet(tmp_path):
    common = ["model.name=lenet", "data.image_size=16", "train.epochs=2", "data.augment.hflip=true",
              "data.augment.crop_padding=2", "data.max_train_samples=320", "data.max_eval_samples=91",
              "train.ema.enabled=true", "train.ema.every_steps=3", "train.ema.decay=0.9"]
    s1 = train_in_process(tmp_path / "w1", *common)  # world size 1 in this process; 2 under torchrun
    one = load_ckpt(tmp_path / "w1/checkpoints/last.pt")
    two, s2 = _train(tmp_path / "w2", 2, *common)
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert one["step"] == two["step"] == 2 * (320 // 32)
    assert max_weight_diff(one["model"], two["model"]) <= 1e-5
    assert one["ema"]["updates"] == two["ema"]["updates"] == one["step"] // 3
    assert max_weight_diff(one["ema"]["weights"], two["ema"]["weights"]) <= 1e-5  # the model EMA too
    # exact evaluation on an odd-sized test set: all 91 samples counted once on 2 ranks
    assert s1["test_count"] == s2["test_count"] == 91
    assert s1["test_acc"] == pytest.approx(s2["test_acc"], abs=1e-9)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One 2-rank run (BatchNorm, model EMA) that three tests read: `python -m distcls.train` under
    torchrun, through tests/exit_threads.py, which records the threads still alive when it returns."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    out, report = tmp / "bn", tmp / "threads"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "tests/exit_threads.py"),
            str(report),
            f"run.out_dir={out}",
            *FAST,
            "model.name=cnn3",
            "model.args.batch_norm=true",
            "train.epochs=1",
            "train.max_steps_per_epoch=10",
            "train.ema.enabled=true",
            "train.ema.every_steps=1",
            "train.ema.decay=0.5",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_ok(proc)
    return proc, out, json.loads((out / "summary.json").read_text()), report


def _evaluate(capsys, args) -> str:
    """`python -m distcls.evaluate args` (one process: this one): its stdout."""
    capsys.readouterr()
    assert run_cli(evaluate.main, [str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_batchnorm_statistics_are_equal_on_every_rank_before_evaluation(two_rank_run, capsys):
    # Without SyncBatchNorm (GPU-only in torch) each rank's running stats see only its slice;
    # they are averaged before every evaluation, so both ranks evaluate the same model and the
    # exact eval equals a single-process eval of the saved weights.
    # The model EMA's BatchNorm statistics too (averaged with the model's at every epoch end): its
    # 2-rank test evaluation equals a single-process evaluation of the EMA rank 0 saved.
    _, out, summary, _ = two_rank_run
    assert summary["world_size"] == 2
    assert f"test accuracy {summary['test_acc']:.4f}" in _evaluate(
        capsys, ["--checkpoint", out / "checkpoints/last.pt"]
    )
    report = json.loads(
        _evaluate(capsys, ["--checkpoint", out / "checkpoints/last.pt", "--ema", "--json", "--no-speed"])
    )
    assert report["weights"] == "ema" and report["count"] == summary["test_count"]
    assert report["acc"] == summary["ema_test_acc"] and report["loss"] == pytest.approx(
        summary["ema_test_loss"], rel=1e-6
    )


def test_a_batchnorm_model_says_its_weights_depend_on_the_world_size(two_rank_run, tmp_path, capsys):
    """Without SyncBatchNorm (refused on CPU) a BatchNorm model is not world-size invariant: said once at
    start, and again on a resume at another world size (which printed only "same sample order")."""
    proc, out, _, _ = two_rank_run
    said = proc.stdout + proc.stderr
    assert said.count("has BatchNorm layers that normalize each rank's 16 images on their own") == 1, said
    assert "its weights depend on the world size (2)" in said
    capsys.readouterr()
    train_in_process(
        tmp_path / "one",
        "model.name=cnn3",
        "model.args.batch_norm=true",
        "train.epochs=2",
        "train.max_steps_per_epoch=10",
        "train.ema.enabled=true",
        "train.ema.every_steps=1",
        "train.ema.decay=0.5",
        resume=str(out / "checkpoints/last.pt"),
    )
    said = "".join(capsys.readouterr())
    assert "saved at world size 2; resuming at world size 1" in said
    assert "BatchNorm normalizes per rank: from here on the run differs from one that stays at world size 2" in said
    assert "normalize each rank's" not in said  # one process: nothing per rank at start


def test_other_ranks_print_no_progress(two_rank_run):
    proc = two_rank_run[0]
    assert proc.stdout.count("done: test acc") == 1  # rank 0 only
    assert "world 2 (torchrun, cpu, gloo)" in proc.stdout


def test_no_gloo_thread_outlives_the_run(two_rank_run):
    # A process group that destroy_process_group cannot free (torch.distributed.nn.functional, first
    # imported by DDP, binds the live WORLD group as a default argument) kept gloo's worker and
    # socket-loop threads running into interpreter shutdown, where a rank was seen to abort
    # ("terminate called without an active exception") after a finished run.
    report = two_rank_run[3]
    for rank in (0, 1):
        threads = Path(f"{report}.{rank}").read_text().split()
        assert threads and not [t for t in threads if "gloo" in t], f"rank {rank} still runs {threads}"
