"""Checkpoints of every earlier format still resume, evaluate and predict.

tests/fixtures/format1_*.pt were written by distcls at commit a05a6d6 (checkpoint format 1, the
format of every checkpoint written before format 2), in one process on the CPU:
- format1_epoch_end.pt: digits, cnn3 width=2 hidden=8, batch 32, 1 epoch of 3 steps (its test
  accuracy was 13/180);
- format1_mid_epoch.pt: digits, tests/stop_model.py (model.args.stop_at=4), batch 32, 2 epochs of
  6 steps, log.every_steps=2, stopped by SIGTERM after step 4 of the first epoch.
"""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import assert_ok, cli_in_process, load_ckpt, train_in_process

FIXTURES = Path(__file__).parent / "fixtures"
EPOCH_END = FIXTURES / "format1_epoch_end.pt"
MID_EPOCH = FIXTURES / "format1_mid_epoch.pt"
EPOCH_END_ARGS = ["model.name=cnn3", "model.args.width=2", "model.args.hidden=8", "train.max_steps_per_epoch=3"]
MID_EPOCH_ARGS = ["model.name=stop_model:build", "train.epochs=2", "train.max_steps_per_epoch=6", "log.every_steps=2"]


def test_the_fixtures_are_format_1():
    for path in (EPOCH_END, MID_EPOCH):
        ck = torch.load(path, weights_only=True)
        assert ck["version"] == 1 and "progress" not in ck
    assert load_ckpt(MID_EPOCH)["epoch_step"] == 4


def test_a_format_1_checkpoint_evaluates(tmp_path, capsys):
    proc = cli_in_process(capsys, "evaluate", ["--checkpoint", EPOCH_END, "--json", "--no-speed"])
    assert_ok(proc)
    report = json.loads(proc.stdout)
    assert report["count"] == 180 and report["acc"] == pytest.approx(13 / 180)


def test_a_format_1_checkpoint_predicts(tmp_path, capsys):
    from sklearn.datasets import load_digits
    image = tmp_path / "digit.png"
    Image.fromarray((load_digits().images[0] * 255 / 16).astype("uint8")).save(image)
    proc = cli_in_process(capsys, "predict", ["--checkpoint", EPOCH_END, "--json", image])
    assert_ok(proc)
    line = json.loads(proc.stdout.splitlines()[0])
    assert line["path"] == str(image) and line["label"] in [str(i) for i in range(10)]


def test_a_format_1_epoch_end_checkpoint_resumes(tmp_path):
    summary = train_in_process(tmp_path / "run", *EPOCH_END_ARGS, "train.epochs=2", resume=str(EPOCH_END))
    assert summary["resumed_from"]["step"] == 3 and summary["resumed_from"]["epoch"] == 1
    assert summary["epochs_completed"] == 2 and summary["global_step"] == 6


def test_a_format_1_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    """Resumed at step 4 of epoch 1 (with rank 0's running sums), the run ends with the weights
    and the records of a run that was never stopped."""
    plain = train_in_process(tmp_path / "plain", *MID_EPOCH_ARGS)
    resumed = train_in_process(tmp_path / "resumed", *MID_EPOCH_ARGS, resume=str(MID_EPOCH))
    assert resumed["resumed_from"]["step"] == 4 and resumed["resumed_from"]["epoch_step"] == 4
    a, b = load_ckpt(tmp_path / "plain/checkpoints/last.pt"), load_ckpt(tmp_path / "resumed/checkpoints/last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["test_acc"] == plain["test_acc"] and resumed["global_step"] == plain["global_step"] == 12
    from distcls.tracking.metrics import read_jsonl
    epoch_records = lambda run: [(r["split"], r["loss"], r["acc"]) for r in read_jsonl(tmp_path / run / "metrics.jsonl")  # noqa: E731
                                 if "epoch_step" not in r and r["split"] == "train" and r["epoch"] == 1]
    assert epoch_records("resumed") == epoch_records("plain")  # the first epoch's loss includes steps 1-4 of the fixture


def test_reading_a_format_1_checkpoint_gives_the_format_2_layout():
    from distcls.checkpoint import read_checkpoint
    ck = read_checkpoint(MID_EPOCH)
    assert ck["progress"] == {"epoch": 0, "epoch_step": 4, "global_step": 4, "best_metric": -1.0, "skipped_steps": 0,
                              "wandb_id": None, "epoch_totals": load_ckpt(MID_EPOCH)["meter"],
                              "logged_totals": load_ckpt(MID_EPOCH)["interval_meter"]}
    assert ck["progress"]["epoch_totals"]["count"] == 128 and "meter" not in ck


def test_a_top_level_copy_that_disagrees_with_the_progress_is_refused():
    from distcls.atomic_files import UnreadableCheckpoint
    from distcls.checkpoint import read_checkpoint, validate_checkpoint
    ck = read_checkpoint(MID_EPOCH)
    ck["step"] = 5
    with pytest.raises(UnreadableCheckpoint, match="its 'step' \\(5\\) differs from its progress's global_step \\(4\\)"):
        validate_checkpoint(ck, "x.pt")
