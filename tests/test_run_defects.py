"""Issue 19, the run defects of the second sweep: a resume with a changed position or schedule key
(#2, #3), stop signals outside the training loop (#4), a full disk during a save (#7), and
train.nonfinite=skip dominating / non-finite numbers in JSON (#8)."""
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, assert_user_error, child_env, cli_in_process, load_ckpt, run_distcls, run_in_process, train_in_process
from distcls import evaluate, predict, train
from distcls.runtime import atomic_files
from distcls.run.runner import Stopped

TESTS = Path(__file__).parent
SHORT = ["train.max_steps_per_epoch=6", "train.epochs=2"]


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (Python's json reads them; JSON does not have them)."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------- #2, #3: what a resume may change


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
    ("optim.lr=0.5", "optim.lr=0.05"),  # #3: the optimizer state and schedule come from the checkpoint
    ("optim.weight_decay=0", "optim.weight_decay=0.0005"),
    ("sched.name=constant", "sched.name=cosine"),
])
def test_a_mid_epoch_resume_that_changes_a_position_or_schedule_key_is_refused(stopped_mid_epoch, capfd, override, saved):
    out = stopped_mid_epoch
    before = {p: p.read_bytes() for p in (out / "checkpoints/last.pt", out / "config.yaml", out / "metrics.jsonl")}
    proc = cli_in_process(capfd, train.main, [f"run.out_dir={out}", *FAST, "model.name=stop_model:build", *SHORT, override, "--resume", "auto"])
    line = assert_user_error(proc, f"was saved with {saved}", f"this run says {override}", f"resume with {saved}",
                             "model.pretrained=")
    assert str(out / "checkpoints/last.pt") in line
    assert {p: p.read_bytes() for p in before} == before  # config.yaml still describes what ran


def test_an_epoch_end_resume_with_a_new_lr_is_refused_and_config_yaml_keeps_what_ran(tmp_path, capfd):
    out = tmp_path / "run"
    train_in_process(out, "train.epochs=1")
    proc = cli_in_process(capfd, train.main, [f"run.out_dir={out}", *FAST, "train.epochs=2", "optim.lr=0.5", "--resume", "auto"])
    assert_user_error(proc, "was saved with optim.lr=0.05", "this run says optim.lr=0.5", "optimizer state and lr schedule",
                      "model.pretrained=")
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
    proc = cli_in_process(capfd, train.main, [f"run.out_dir={out}", *FAST, "train.max_steps_per_epoch=6", "train.epochs=1", "--resume", "auto"])
    assert_user_error(proc, "has trained 2 epochs, more than train.epochs=1", "resume with train.epochs=2", "distcls.evaluate")
    assert {p: p.read_bytes() for p in before} == before


# ----------------------------------------------------------------------------- #4: signals outside the training loop


def _start_train_process(args, driver: str, log_dir: Path) -> subprocess.Popen:
    """`python -m distcls.train` (run by its real entry point, `train.cli`), after `driver`'s code;
    its stdout and stderr go to files in `log_dir`."""
    script = f"import sys\n{driver}\nfrom distcls import train\nsys.argv = ['distcls.train', *{[str(a) for a in args]!r}]\ntrain.cli()\n"
    with open(log_dir / "stdout", "w") as stdout, open(log_dir / "stderr", "w") as stderr:
        return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=stdout, stderr=stderr, text=True,
                                env=child_env({"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}))


def _one_line(proc, prefix: str) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.startswith("distcls: ")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    return lines[0]


RUN = [*FAST, "model.name=stop_model:build", "train.epochs=1", "train.max_steps_per_epoch=4", "data.val_fraction=0",
       "data.eval_batch_size=4096"]  # no validation: eval forward 1 is the model check, 2 the (one) test batch, 3 the plots'

SECOND_SIGTERM = ("import os, signal\nfrom distcls.run import outputs as rundir\nrelease = rundir.RunDirLock.release\n"
                  "def release_after_a_second_sigterm(self):\n    os.kill(os.getpid(), signal.SIGTERM)\n    release(self)\n"
                  "rundir.RunDirLock.release = release_after_a_second_sigterm\n")

# What each test below runs (its train overrides after run.out_dir, and the driver code), from its parameters.
SIGNAL_RUNS = {
    "test_a_signal_during_the_setup_stops_at_the_first_step_with_exit_3":
        lambda sig: ([*RUN, "model.args.at_build=true", f"model.args.signal={sig}"], ""),
    "test_a_signal_after_the_last_step_lets_the_run_finish_with_exit_0":
        lambda sig, eval_call, plots: ([*RUN, f"log.plots={str(plots).lower()}", f"model.args.stop_at_eval={eval_call}",
                                        f"model.args.signal={sig}"], ""),
    "test_a_second_sigterm_after_the_save_still_exits_3": lambda: ([*RUN, "model.args.stop_at=2"], SECOND_SIGTERM),
}


class SignalRuns:
    """The runs of the selected tests below, all started at once by the first of them: independent
    processes (each sends itself its signal at a fixed point of the run) that mostly import, so on
    2 cores together they take about half the time they take one after the other."""

    def __init__(self, tmp_path_factory, items):
        self.runs = {}
        for item in items:
            make = SIGNAL_RUNS.get(getattr(item, "originalname", None))
            if make is not None:
                params = item.callspec.params if hasattr(item, "callspec") else {}
                args, driver = make(**params)
                log_dir = tmp_path_factory.mktemp("signal_run")
                out = log_dir / "run"
                self.runs[item.name] = (out, log_dir, _start_train_process([f"run.out_dir={out}", *args], driver, log_dir))

    def finished(self, name: str) -> tuple[Path, subprocess.CompletedProcess]:
        """The test `name`'s run dir and finished process."""
        out, log_dir, proc = self.runs[name]
        proc.wait(timeout=300)
        return out, subprocess.CompletedProcess(proc.args, proc.returncode, (log_dir / "stdout").read_text(),
                                                (log_dir / "stderr").read_text())

    def stop(self) -> None:
        for _, _, proc in self.runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def signal_runs(request, tmp_path_factory):
    runs = SignalRuns(tmp_path_factory, [item for item in request.session.items if item.module is request.module])
    yield runs
    runs.stop()


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_setup_stops_at_the_first_step_with_exit_3(signal_runs, request, sig):
    out, proc = signal_runs.finished(request.node.name)
    assert proc.returncode == 3, proc.stderr
    line = _one_line(proc, f"distcls: stopped: stopped by {sig}; checkpoint saved to {out / 'checkpoints/last.pt'}")
    assert "--resume auto" in line
    assert load_ckpt(out / "checkpoints/last.pt")["epoch_step"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("sig, eval_call, plots", [("SIGTERM", 2, False), ("SIGINT", 2, False), ("SIGTERM", 3, True)])
def test_a_signal_after_the_last_step_lets_the_run_finish_with_exit_0(signal_runs, request, sig, eval_call, plots):
    """During the final test evaluation (eval forward 2) or the end-of-run plots (3)."""
    out, proc = signal_runs.finished(request.node.name)
    assert proc.returncode == 0, proc.stderr
    _one_line(proc, f"distcls: done: {sig} arrived after the last training step; the run finished and everything is written")
    assert strict_json((out / "summary.json").read_text())["test_count"] > 0
    if plots:
        assert (out / "plots/samples.png").is_file()


@pytest.mark.slow
def test_a_second_sigterm_after_the_save_still_exits_3(signal_runs, request):
    """The second SIGTERM arrives as the run releases its out_dir, after the first one's checkpoint
    was saved (where the old code had restored the default handler, and exited 143)."""
    out, proc = signal_runs.finished(request.node.name)
    assert proc.returncode == 3, proc.stderr
    _one_line(proc, "distcls: stopped: stopped by SIGTERM; checkpoint saved to")
    assert load_ckpt(out / "checkpoints/last.pt")["epoch_step"] == 2


# ----------------------------------------------------------------------------- #7: a full disk during a save


def test_a_full_disk_during_a_checkpoint_save_is_one_line_naming_what_is_safe(tmp_path, capfd):
    out = tmp_path / "run"
    writes = []

    def disk_full_at_the_second_save(stage, path, tmp):
        if stage == "written" and path.name == "last.pt":
            writes.append(path)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    args = [f"run.out_dir={out}", *FAST, "train.epochs=3", "train.max_steps_per_epoch=3"]
    with atomic_files.inject_fault(disk_full_at_the_second_save):
        proc = cli_in_process(capfd, train.main, args)
    assert proc.returncode == 5  # ExitCode.WRITE_FAILED
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"distcls: error: could not save checkpoint {out / 'checkpoints/last.pt'}: No space left on device")
    assert f"the disk holding {out / 'checkpoints'}: " in lines[0] and "MiB free" in lines[0]
    assert "the previous checkpoint" in lines[0] and "is intact" in lines[0] and "--resume auto" in lines[0]
    assert load_ckpt(out / "checkpoints/last.pt")["epoch"] == 1  # the previous save, whole
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert cli_in_process(capfd, train.main, [*args, "--resume", "auto"]).returncode == 0


@pytest.mark.slow
def test_a_full_disk_during_a_save_under_torchrun_stops_every_rank_with_one_line(tmp_path):
    out = tmp_path / "run"
    # Rank 0's line is delayed 3 s, so rank 1 is done first: it used to exit 5 at once, and torchrun then
    # killed rank 0 (at times mid-teardown: SIGABRT), naming rank 1 as the root cause.
    proc = run_distcls("train", [f"run.out_dir={out}", *FAST, "model.name=full_disk_model:build", "train.epochs=3",
                                 "train.max_steps_per_epoch=3", "model.args.report_delay_s=3"], nproc=2,
                       env={"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"})
    errors = [l for l in proc.stderr.splitlines() if l.startswith("distcls: ")]
    assert len(errors) == 1 and errors[0].startswith(f"distcls: error: could not save checkpoint {out / 'checkpoints/last.pt'}"), proc.stderr
    # rank 0 exits 5 (torchrun's root cause); every rank learnt of the failure at the save, none fails on a broken collective
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 5\b", root_cause), proc.stderr[-3000:]
    assert "SIGABRT" not in proc.stderr and "RuntimeError" not in proc.stderr and "DistBackendError" not in proc.stderr
    assert load_ckpt(out / "checkpoints/last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- #8: nonfinite=skip, JSON


def test_skipped_steps_are_warned_once_per_epoch(tmp_path, capfd, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    proc = cli_in_process(capfd, train.main, [f"run.out_dir={out}", *FAST, *SHORT, "model.name=nan_model:build", "train.nonfinite=skip",
                                    "model.args.nan_steps=[2,8,9]"])
    assert proc.returncode == 0, proc.stderr
    warnings = [l for l in proc.stderr.splitlines() if "skipped as non-finite" in l]
    assert warnings == ["distcls: warning: epoch 1: 1 of 6 steps skipped as non-finite loss or gradients (train.nonfinite=skip); "
                        "the run stops if more than train.max_skipped_fraction=0.5 of an epoch's steps are skipped",
                        "distcls: warning: epoch 2: 2 of 6 steps skipped as non-finite loss or gradients (train.nonfinite=skip); "
                        "3 in all; the run stops if more than train.max_skipped_fraction=0.5 of an epoch's steps are skipped"]


def test_a_run_that_skips_most_steps_stops_with_exit_4(tmp_path, capfd, monkeypatch):
    """The issue's optim.lr=1e30: 13 of 14 steps skipped, then 'done' and exit 0."""
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    proc = cli_in_process(capfd, train.main, [f"run.out_dir={out}", *FAST, *SHORT, "model.name=nan_model:build", "train.nonfinite=skip",
                                    "model.args.nan_steps=[2,3,4,5]"])
    assert proc.returncode == 4
    errors = [l for l in proc.stderr.splitlines() if l.startswith("distcls: error: ")]
    assert errors == [l for l in proc.stderr.splitlines() if l.startswith("distcls: ") and "warning" not in l]
    assert len(errors) == 1 and "epoch 1: 4 of 6 steps skipped as non-finite" in errors[0]
    assert "train.max_skipped_fraction=0.5" in errors[0] and "lower optim.lr" in errors[0]
    assert not (out / "summary.json").exists()
    assert not list((out / "checkpoints").glob("*.pt"))  # no epoch-end checkpoint of the run that did not train


def test_an_epoch_with_every_step_skipped_is_not_logged_as_loss_0_and_all_json_is_strict(tmp_path, capfd, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    proc = cli_in_process(capfd, train.main, [f"run.out_dir={out}", *FAST, *SHORT, "model.name=nan_model:build", "train.nonfinite=skip",
                                    "model.args.nan_steps=[1,2,3,4,5,6]", "train.max_skipped_fraction=1.0", "log.plots=true"])
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
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "run"
    proc = cli_in_process(capfd, train.main, [f"run.out_dir={out}", *FAST, *SHORT, "model.name=nan_model:build", "train.nonfinite=skip",
                                    "model.args.nan_steps=[3,4]", "log.every_steps=2", "log.console=plain"])
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
    proc = cli_in_process(capfd, evaluate.main, ["--checkpoint", nan_ckpt, "--json", "--no-speed", "--out-dir", tmp_path / "eval"])
    assert proc.returncode == 0, proc.stderr
    assert strict_json(proc.stdout)["loss"] is None
    assert strict_json((tmp_path / "eval/eval_test.json").read_text())["loss"] is None
    from PIL import Image
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    proc = cli_in_process(capfd, predict.main, ["--checkpoint", nan_ckpt, "--json", tmp_path / "x.png"])
    assert proc.returncode == 0, proc.stderr
    assert strict_json(proc.stdout.splitlines()[0])["prob"] is None
