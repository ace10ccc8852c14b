"""train.nonfinite=skip: skipped steps are warned once per epoch, a run that skips most of them stops with
exit 4, an epoch or log interval with every step skipped records null (never loss 0), and every JSON
file and printout is strict JSON (no NaN/Infinity)."""
import json
from pathlib import Path

import torch
from conftest import FAST, cli_in_process, load_ckpt, train_in_process

from distcls import evaluate, predict, train

TESTS = Path(__file__).parent
SHORT = ["train.max_steps_per_epoch=6", "train.epochs=2"]


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (Python's json reads them; JSON does not have them)."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _skipping_run(tmp_path, capfd, monkeypatch, *overrides):
    """A short run of tests/nan_model.py with train.nonfinite=skip: (its out_dir, the finished process)."""
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    args = [f"run.out_dir={out}", *FAST, *SHORT, "model.name=nan_model:build", "train.nonfinite=skip", *overrides]
    return out, cli_in_process(capfd, train.main, args)


def test_skipped_steps_are_warned_once_per_epoch(tmp_path, capfd, monkeypatch):
    out, proc = _skipping_run(tmp_path, capfd, monkeypatch, "model.args.nan_steps=[2,8,9]")
    assert proc.returncode == 0, proc.stderr
    warnings = [l for l in proc.stderr.splitlines() if "skipped as non-finite" in l]
    assert warnings == [
        "distcls: warning: epoch 1: 1 of 6 steps skipped as non-finite loss or gradients (train.nonfinite=skip); "
        "the run stops if more than train.max_skipped_fraction=0.5 of an epoch's steps are skipped",
        "distcls: warning: epoch 2: 2 of 6 steps skipped as non-finite loss or gradients (train.nonfinite=skip); "
        "3 in all; the run stops if more than train.max_skipped_fraction=0.5 of an epoch's steps are skipped",
    ]


def test_a_run_that_skips_most_steps_stops_with_exit_4(tmp_path, capfd, monkeypatch):
    """The issue's optim.lr=1e30: 13 of 14 steps skipped, then 'done' and exit 0."""
    out, proc = _skipping_run(tmp_path, capfd, monkeypatch, "model.args.nan_steps=[2,3,4,5]")
    assert proc.returncode == 4
    errors = [l for l in proc.stderr.splitlines() if l.startswith("distcls: error: ")]
    assert errors == [l for l in proc.stderr.splitlines() if l.startswith("distcls: ") and "warning" not in l]
    assert len(errors) == 1 and "epoch 1: 4 of 6 steps skipped as non-finite" in errors[0]
    assert "train.max_skipped_fraction=0.5" in errors[0] and "lower optim.lr" in errors[0]
    assert not (out / "summary.json").exists()
    assert not list((out / "checkpoints").glob("*.pt"))  # no epoch-end checkpoint of the run that did not train


def test_an_epoch_with_every_step_skipped_is_not_logged_as_loss_0_and_all_json_is_strict(tmp_path, capfd, monkeypatch):
    out, proc = _skipping_run(
        tmp_path, capfd, monkeypatch, "model.args.nan_steps=[1,2,3,4,5,6]", "train.max_skipped_fraction=1.0",
        "log.plots=true",
    )
    assert proc.returncode == 0, proc.stderr
    assert "plots not written" not in proc.stderr and (out / "plots/curves.png").is_file()  # null points are gaps
    records = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch1 = [r for r in records if r["split"] == "train" and r["epoch"] == 1]
    assert epoch1 == [r for r in epoch1 if r["loss"] is None and r["acc"] is None] and len(epoch1) == 1
    assert epoch1[0]["skipped_steps"] == 6
    epoch2 = [r for r in records if r["split"] == "train" and r["epoch"] == 2]
    assert epoch2[0]["loss"] > 0
    assert strict_json((out / "summary.json").read_text())["skipped_steps"] == 6
    assert "loss 0.0000 acc 0.0000" not in proc.stderr + proc.stdout


def test_a_log_interval_with_every_step_skipped_records_null_not_loss_0(tmp_path, capfd, monkeypatch):
    out, proc = _skipping_run(
        tmp_path, capfd, monkeypatch, "model.args.nan_steps=[3,4]", "log.every_steps=2", "log.console=plain"
    )
    assert proc.returncode == 0, proc.stderr
    records = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    intervals = {r["step"]: (r["loss"], r["acc"]) for r in records if "epoch_step" in r}
    assert intervals[4] == (None, None)  # steps 3 and 4: no sample counted
    assert all(loss > 0 for step, (loss, _) in intervals.items() if step != 4)
    assert "epoch 1 step 4 loss nan acc nan" in proc.stderr + proc.stdout


def test_evaluate_and_predict_json_is_strict_for_non_finite_numbers(tmp_path, capfd):
    out = tmp_path / "run"
    train_in_process(out, "train.epochs=1", "train.max_steps_per_epoch=2")
    ck = load_ckpt(out / "checkpoints/last.pt")
    ck["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ck["model"].items()}
    nan_ckpt = tmp_path / "nan.pt"
    torch.save(ck, nan_ckpt)
    proc = cli_in_process(
        capfd, evaluate.main, ["--checkpoint", nan_ckpt, "--json", "--no-speed", "--out-dir", tmp_path / "eval"]
    )
    assert proc.returncode == 0, proc.stderr
    assert strict_json(proc.stdout)["loss"] is None
    assert strict_json((tmp_path / "eval/eval_test.json").read_text())["loss"] is None
    from PIL import Image
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    proc = cli_in_process(capfd, predict.main, ["--checkpoint", nan_ckpt, "--json", tmp_path / "x.png"])
    assert proc.returncode == 0, proc.stderr
    assert strict_json(proc.stdout.splitlines()[0])["prob"] is None
