"""log.tensorboard=true: every metrics.jsonl record as TensorBoard scalars, read back with TensorBoard's
own reader; a resumed run's folder holds every step once (what the stopped run logged after its
checkpoint is dropped)."""
import pytest

from conftest import train_in_process
from distcls.tracking.metrics import read_jsonl

pytest.importorskip("tensorboard")

ARGS = ["log.tensorboard=true", "log.every_steps=5", "data.max_train_samples=320", "train.epochs=1"]


def _scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(out) -> dict:
    """metrics.jsonl's records as TensorBoard tags would hold them."""
    tags: dict = {}
    for r in read_jsonl(out / "metrics.jsonl"):
        group = "train_step" if r["split"] == "train" and "epoch_step" in r else r["split"]
        for key in ("loss", "acc", "lr"):
            tags.setdefault(f"{group}/{key}", []).append((r["step"], r[key]))
    return tags


def test_every_record_is_a_scalar_once_even_after_a_resume(tmp_path):
    out = tmp_path / "run"
    train_in_process(out, *ARGS)
    # The stopped process's last words: events after the checkpoint's step (10) that metrics.jsonl never kept.
    from torch.utils.tensorboard import SummaryWriter
    lost = SummaryWriter(log_dir=str(out / "tensorboard"))
    for step in (11, 12, 13):
        lost.add_scalar("train_step/loss", 99.0, step)
    lost.close()
    train_in_process(out, *ARGS[:-1], "train.epochs=2", resume="auto")
    got, want = _scalars(out / "tensorboard"), _expected(out)
    # the first run's final test (step 10) stays in TensorBoard; metrics.jsonl keeps only the last run's
    assert got["test/acc"][-1] == (20, pytest.approx(want["test/acc"][-1][1], rel=1e-6)) and len(got["test/acc"]) == 2
    for tag, points in want.items():
        if tag.startswith("test/"):
            continue
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # each step once, in order: 11-13's 99.0 is gone
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert {"val/loss", "test/acc", "train_step/loss", "train/acc"} <= got.keys()
    assert 99.0 not in [v for _, v in got["train_step/loss"]]


def test_a_run_stopped_by_a_signal_and_resumed_logs_every_step_once(tmp_path, monkeypatch):
    """SIGTERM in step 10 (tests/stop_model.py: a deterministic preemption), then --resume auto: TensorBoard
    reads back exactly metrics.jsonl's records, the train curve continuing from the checkpoint's step."""
    from pathlib import Path

    from conftest import run_in_process
    from distcls.run.runner import Stopped
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    args = [
        "model.name=stop_model:build", "log.tensorboard=true", "log.every_steps=2", "train.epochs=2",
        "train.max_steps_per_epoch=8",
    ]
    out = tmp_path / "run"
    assert isinstance(run_in_process(out, *args, "model.args.stop_at=11"), Stopped)
    train_in_process(out, *args, resume="auto")
    got, want = _scalars(out / "tensorboard"), _expected(out)
    assert [s for s, _ in want["train_step/loss"]] == list(range(2, 17, 2))
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_a_fresh_start_drops_what_an_attempt_without_a_checkpoint_logged(tmp_path):
    """A requeued job whose first attempt died before any checkpoint starts fresh: metrics.jsonl starts anew, and so
    does TensorBoard."""
    out = tmp_path / "run"
    from torch.utils.tensorboard import SummaryWriter
    earlier = SummaryWriter(log_dir=str(out / "tensorboard"))
    for step in (5, 10, 15):
        earlier.add_scalar("train_step/loss", 99.0, step)
    earlier.close()
    train_in_process(out, *ARGS)
    got, want = _scalars(out / "tensorboard"), _expected(out)
    assert got["train_step/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in want["train_step/loss"]]
