"""Guarantees across world sizes, with real gloo process groups (torchrun, 2 ranks)."""
import json
import subprocess
import sys

import pytest

from conftest import FAST, ROOT, assert_ok, child_env, load_ckpt, max_weight_diff, run_distcls

pytestmark = pytest.mark.slow  # multi-process runs, signals and kill -9


def _train(out, nproc, *overrides):
    proc = run_distcls("train", [f"run.out_dir={out}", *FAST, *overrides], nproc=nproc)
    assert_ok(proc)
    return load_ckpt(out / "checkpoints/last.pt"), json.loads((out / "summary.json").read_text())


def test_world_size_invariance_lenet(tmp_path):
    common = ["model.name=lenet", "data.image_size=16", "train.epochs=2", "data.augment.hflip=true",
              "data.augment.crop_padding=2", "data.max_eval_samples=91",
              "train.ema.enabled=true", "train.ema.every_steps=3", "train.ema.decay=0.9"]
    one, s1 = _train(tmp_path / "w1", 1, *common)
    two, s2 = _train(tmp_path / "w2", 2, *common)
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert one["step"] == two["step"] == 2 * (1437 // 32)
    assert max_weight_diff(one["model"], two["model"]) <= 1e-5
    assert one["ema"]["updates"] == two["ema"]["updates"] == one["step"] // 3
    assert max_weight_diff(one["ema"]["weights"], two["ema"]["weights"]) <= 1e-5  # the model EMA too
    # exact evaluation on an odd-sized test set: all 91 samples counted once on 2 ranks
    assert s1["test_count"] == s2["test_count"] == 91
    assert s1["test_acc"] == pytest.approx(s2["test_acc"], abs=1e-9)


def test_batchnorm_statistics_are_equal_on_every_rank_before_evaluation(tmp_path):
    # Without SyncBatchNorm (GPU-only in torch) each rank's running stats see only its slice;
    # they are averaged before every evaluation, so both ranks evaluate the same model and the
    # exact eval equals a single-process eval of the saved weights.
    # The model EMA's BatchNorm statistics too (averaged with the model's at every epoch end): its
    # 2-rank test evaluation equals a single-process evaluation of the EMA rank 0 saved.
    out = tmp_path / "bn"
    _, summary = _train(out, 2, "model.name=cnn3", "model.args.batch_norm=true", "train.epochs=1", "train.max_steps_per_epoch=10",
                        "train.ema.enabled=true", "train.ema.every_steps=1", "train.ema.decay=0.5")
    proc = run_distcls("evaluate", ["--checkpoint", out / "checkpoints/last.pt"])
    assert_ok(proc)
    assert f"test accuracy {summary['test_acc']:.4f}" in proc.stdout
    proc = run_distcls("evaluate", ["--checkpoint", out / "checkpoints/last.pt", "--ema", "--json", "--no-speed"])
    assert_ok(proc)
    report = json.loads(proc.stdout)
    assert report["weights"] == "ema" and report["count"] == summary["test_count"]
    assert report["acc"] == summary["ema_test_acc"] and report["loss"] == pytest.approx(summary["ema_test_loss"], rel=1e-6)


def test_other_ranks_print_no_progress(tmp_path):
    proc = run_distcls("train", [f"run.out_dir={tmp_path / 'r'}", *FAST, "train.epochs=1", "train.max_steps_per_epoch=2"], nproc=2)
    assert_ok(proc)
    assert proc.stdout.count("done: test acc") == 1  # rank 0 only
    assert "world 2 (torchrun, cpu, gloo)" in proc.stdout


def test_no_gloo_thread_outlives_the_run(tmp_path):
    # A process group that destroy_process_group cannot free (torch.distributed.nn.functional, first
    # imported by DDP, binds the live WORLD group as a default argument) kept gloo's worker and
    # socket-loop threads running into interpreter shutdown, where a rank was seen to abort
    # ("terminate called without an active exception") after a finished run.
    report = tmp_path / "threads"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests/exit_threads.py"), str(report), f"run.out_dir={tmp_path / 'run'}", *FAST,
                           "data.max_train_samples=256", "data.max_eval_samples=64", "train.epochs=1"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    for rank in (0, 1):
        threads = (tmp_path / f"threads.{rank}").read_text().split()
        assert not [t for t in threads if "gloo" in t], f"rank {rank} still runs {threads}"
