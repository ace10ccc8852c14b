"""Checkpoints of every earlier format still resume, evaluate and predict.

tests/fixtures/format1_*.pt were written by distcls at commit a05a6d6 (checkpoint format 1, the
format of every checkpoint written before format 2), in one process on the CPU:
- format1_epoch_end.pt: digits, cnn3 width=2 hidden=8, batch 32, 1 epoch of 3 steps (its test
  accuracy was 13/180);
- format1_mid_epoch.pt: digits, tests/stop_model.py (model.args.stop_at=4), batch 32, 2 epochs of
  6 steps, log.every_steps=2, stopped by SIGTERM after step 4 of the first epoch.

The fixtures' floats were computed on another CPU, and no CPU math library promises the same
rounding on another processor: so no test here compares a number computed from them elsewhere with
one computed here (tests/README.md, "Numbers from another machine"). What the tests prove instead:
reading a format-1 file gives its tensors bitwise, and everything computed from it here equals what
the same state re-saved in today's format gives here.
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


def _resaved_in_format_2(tmp_path) -> Path:
    """The format-1 mid-epoch fixture as read today (format-2 layout), written back as a format-2 file."""
    from distcls.checkpoint import FORMAT_VERSION, read_checkpoint
    ck = read_checkpoint(MID_EPOCH)
    assert ck["version"] == FORMAT_VERSION == 2
    path = tmp_path / "format2.pt"
    torch.save(ck, path)
    return path


def test_reading_a_format_1_checkpoint_gives_its_tensors_bitwise():
    from distcls.checkpoint import read_checkpoint
    for path in (EPOCH_END, MID_EPOCH):
        raw, read = load_ckpt(path), read_checkpoint(path)
        for entry in ("model", "optimizer", "rng"):
            assert _flat(read[entry]) == _flat(raw[entry]), (path.name, entry)


def _flat(state, prefix=""):
    """A nested state as {path: value}, tensors as (dtype, shape, bytes): equal means bitwise equal."""
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state) for k, v in _flat(sub, f"{prefix}/{i}").items()}
    if isinstance(state, torch.Tensor):
        return {prefix: (state.dtype, tuple(state.shape), state.contiguous().view(-1).view(torch.uint8).tolist()
                         if state.numel() else [])}
    return {prefix: state}


def test_a_format_1_checkpoint_evaluates(tmp_path, capsys):
    # the accuracy is the one its weights give on this CPU (never a number computed elsewhere): the
    # same weights in a format-2 file evaluate to the same report, every sample counted once
    resaved = tmp_path / "format2_epoch_end.pt"
    from distcls.checkpoint import read_checkpoint
    torch.save(read_checkpoint(EPOCH_END), resaved)
    reports = []
    for path in (EPOCH_END, resaved):
        proc = cli_in_process(capsys, "evaluate", ["--checkpoint", path, "--json", "--no-speed"])
        assert_ok(proc)
        reports.append({k: v for k, v in json.loads(proc.stdout).items() if k != "checkpoint"})
    assert reports[0]["count"] == 180 and 0 <= reports[0]["acc"] <= 1
    assert reports[0] == reports[1]


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
    """Resumed at step 4 of epoch 1 (with rank 0's running sums), the run ends with bitwise the
    weights and the records of the same state resumed from today's format, on this CPU. (That a
    format-2 mid-epoch resume equals a run never stopped is test_resume's; the fixture's own steps
    1-4 were computed on another CPU, so a run that starts here may differ from it in the last bit.)"""
    resaved = _resaved_in_format_2(tmp_path)
    old = train_in_process(tmp_path / "format1", *MID_EPOCH_ARGS, resume=str(MID_EPOCH))
    new = train_in_process(tmp_path / "format2", *MID_EPOCH_ARGS, resume=str(resaved))
    for summary in (old, new):
        assert summary["resumed_from"]["step"] == 4 and summary["resumed_from"]["epoch_step"] == 4
        assert summary["global_step"] == 12
    a, b = load_ckpt(tmp_path / "format1/checkpoints/last.pt"), load_ckpt(tmp_path / "format2/checkpoints/last.pt")
    assert _flat(a["model"]) == _flat(b["model"]) and _flat(a["optimizer"]) == _flat(b["optimizer"])
    assert not torch.equal(a["model"]["net.1.weight"], load_ckpt(MID_EPOCH)["model"]["net.1.weight"])  # it trained on
    assert old["test_acc"] == new["test_acc"]
    from distcls.tracking.metrics import read_jsonl

    def records(run):
        rows = read_jsonl(tmp_path / run / "metrics.jsonl")
        return [(r["split"], r.get("epoch_step"), r["loss"], r["acc"]) for r in rows if r["split"] in ("train", "val")]

    # the first epoch's loss includes steps 1-4
    assert records("format1") == records("format2") and len(records("format1")) >= 4
    # and it is the run the fixture was stopped from: a run never stopped, here, ends within rounding of it (the
    # fixture's steps 1-4 came from another CPU: close, not bitwise), its records within rounding too
    plain = train_in_process(tmp_path / "plain", *MID_EPOCH_ARGS)
    c = load_ckpt(tmp_path / "plain/checkpoints/last.pt")
    assert all(torch.allclose(a["model"][k], c["model"][k], rtol=1e-4, atol=1e-6) for k in c["model"])
    assert abs(plain["test_acc"] - old["test_acc"]) <= 2 / 180
    keyed = lambda run: {(r["split"], r["epoch"], r.get("epoch_step")): (r["loss"], r["acc"])  # noqa: E731
                         for r in read_jsonl(tmp_path / run / "metrics.jsonl") if r["split"] in ("train", "val")}
    resumed, never_stopped = keyed("format1"), keyed("plain")
    assert len(resumed) >= 4 and set(resumed) <= set(never_stopped)
    for key, (loss, acc) in resumed.items():
        assert loss == pytest.approx(never_stopped[key][0], rel=1e-4) and abs(acc - never_stopped[key][1]) <= 2 / 128, (
            key
        )


def test_reading_a_format_1_checkpoint_gives_the_format_2_layout():
    from distcls.checkpoint import read_checkpoint
    ck = read_checkpoint(MID_EPOCH)
    assert ck["progress"] == {"epoch": 0, "epoch_step": 4, "global_step": 4, "best_metric": -1.0, "skipped_steps": 0,
                              "wandb_id": None, "epoch_totals": load_ckpt(MID_EPOCH)["meter"],
                              "logged_totals": load_ckpt(MID_EPOCH)["interval_meter"]}
    assert ck["progress"]["epoch_totals"]["count"] == 128 and "meter" not in ck


def test_a_top_level_copy_that_disagrees_with_the_progress_is_refused():
    from distcls.runtime.atomic_files import UnreadableCheckpoint
    from distcls.checkpoint import read_checkpoint, validate_checkpoint
    ck = read_checkpoint(MID_EPOCH)
    ck["step"] = 5
    with pytest.raises(
        UnreadableCheckpoint, match="its 'step' \\(5\\) differs from its progress's global_step \\(4\\)"
    ):
        validate_checkpoint(ck, "x.pt")
