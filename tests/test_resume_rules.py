"""What a resume may change: a position, schedule or optimizer key of a stopped run is refused naming the
saved value; accum_steps and epochs may change; the log interval's running sums continue across a resume."""
import json
from pathlib import Path

import pytest
from conftest import FAST, assert_user_error, cli_in_process, load_ckpt, run_in_process, train_in_process

from distcls import train
from distcls.run.runner import Stopped
from distcls.tracking.metrics import read_jsonl


def test_interval_record_after_a_mid_epoch_resume_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """The checkpoint carries the log interval's running sums."""
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

TESTS = Path(__file__).parent
SHORT = ["train.max_steps_per_epoch=6", "train.epochs=2"]




@pytest.fixture
def stopped_mid_epoch(tmp_path, monkeypatch) -> Path:
    """A run stopped by SIGTERM in epoch 1's step 4 (last.pt at epoch_step 4, batch 32)."""
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    assert isinstance(run_in_process(out, "model.name=stop_model:build", *SHORT, "model.args.stop_at=4"), Stopped)
    assert load_ckpt(out / "checkpoints/last.pt")["epoch_step"] == 4
    return out


@pytest.mark.parametrize("override, saved", [
    ("data.batch_size=64", "data.batch_size=32"),  # the case: would resume at sample 256 instead of 128
    ("data.batch_size=16", "data.batch_size=32"),
    ("run.seed=1", "run.seed=0"),  # another shuffle order and split
    ("data.val_fraction=0.2", "data.val_fraction=0.1"),  # another training split
    ("train.max_steps_per_epoch=8", "train.max_steps_per_epoch=6"),  # another epoch length and schedule
    ("optim.lr=0.5", "optim.lr=0.05"),  # the optimizer state and schedule come from the checkpoint
    ("optim.weight_decay=0", "optim.weight_decay=0.0005"),
    ("sched.name=constant", "sched.name=cosine"),
])
def test_a_mid_epoch_resume_that_changes_a_position_or_schedule_key_is_refused(
    stopped_mid_epoch, capfd, override, saved
):
    out = stopped_mid_epoch
    before = {p: p.read_bytes() for p in (out / "checkpoints/last.pt", out / "config.yaml", out / "metrics.jsonl")}
    proc = cli_in_process(
        capfd,
        train.main,
        [f"run.out_dir={out}", *FAST, "model.name=stop_model:build", *SHORT, override, "--resume", "auto"],
    )
    line = assert_user_error(proc, f"was saved with {saved}", f"this run says {override}", f"resume with {saved}",
                             "model.pretrained=")
    assert str(out / "checkpoints/last.pt") in line
    assert {p: p.read_bytes() for p in before} == before  # config.yaml still describes what ran


def test_an_epoch_end_resume_with_a_new_lr_is_refused_and_config_yaml_keeps_what_ran(tmp_path, capfd):
    out = tmp_path / "run"
    train_in_process(out, "train.epochs=1")
    proc = cli_in_process(
        capfd, train.main, [f"run.out_dir={out}", *FAST, "train.epochs=2", "optim.lr=0.5", "--resume", "auto"]
    )
    assert_user_error(
        proc, "was saved with optim.lr=0.05", "this run says optim.lr=0.5", "optimizer state and lr schedule",
        "model.pretrained=",
    )
    assert "lr: 0.05" in (out / "config.yaml").read_text()


def test_a_resume_may_change_accum_steps_and_epochs(stopped_mid_epoch, capfd):
    """train.accum_steps splits the same global batch (the same samples per step), like the world
    size; train.epochs lengthens the run. Neither changes what the saved position means."""
    out = stopped_mid_epoch
    proc = cli_in_process(capfd, train.main, [f"run.out_dir={out}", *FAST, "model.name=stop_model:build", *SHORT,
                                    "train.accum_steps=2", "train.epochs=3", "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["global_step"] == 3 * 6


@pytest.mark.parametrize("summary", [True, False])
def test_a_resume_with_fewer_epochs_than_the_checkpoint_trained_is_refused(tmp_path, capfd, summary):
    """train.epochs below the checkpoint's epochs cannot be resumed: the run would write a summary of
    train.epochs epochs for weights trained longer (was: exit 0, 'epochs / steps: 1 / 12')."""
    out = tmp_path / "run"
    train_in_process(out, *SHORT)  # 2 epochs of 6 steps
    if not summary:
        (out / "summary.json").unlink()  # stopped between the final save and the summary
    before = {p: p.read_bytes() for p in (out / "checkpoints/last.pt", out / "metrics.jsonl")}
    proc = cli_in_process(
        capfd,
        train.main,
        [f"run.out_dir={out}", *FAST, "train.max_steps_per_epoch=6", "train.epochs=1", "--resume", "auto"],
    )
    assert_user_error(
        proc, "has trained 2 epochs, more than train.epochs=1", "resume with train.epochs=2", "distcls.evaluate"
    )
    assert {p: p.read_bytes() for p in before} == before
