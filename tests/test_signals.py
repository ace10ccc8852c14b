"""Stop signals outside the training loop: during the setup (stops at the first step, exit 3), during
validation (stops at that epoch's end), after the last step (the run finishes, exit 0), a second SIGTERM
after the save (still exit 3)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, ROOT, child_env, load_ckpt, run_in_process, train_in_process

from distcls.run.runner import Stopped


def _stop_in_first_validation(tmp_path, monkeypatch, epochs):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    args = ["model.name=stop_model:build", f"train.epochs={epochs}", "train.max_steps_per_epoch=5"]
    out = tmp_path / "run"
    stopped = run_in_process(out, *args, "model.args.stop_at_eval=2")  # SIGTERM in epoch 1's first validation batch
    assert isinstance(stopped, Stopped) and stopped.signal_name == "SIGTERM"
    ck = load_ckpt(out / "checkpoints/last.pt")
    assert (ck["epoch"], ck["epoch_step"], ck["step"]) == (1, 0, 5)  # saved at that epoch's end, not a step later
    return train_in_process(out, *args, resume="auto")


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_signal_during_validation_stops_at_that_epochs_end(tmp_path, monkeypatch, epochs):
    """A stop signal that arrives while the epoch end evaluates is agreed there (one explicit
    all-reduce per epoch): the run saves at that epoch's end and exits 3, also after its last epoch."""
    summary = _stop_in_first_validation(tmp_path, monkeypatch, epochs)
    assert summary["epochs_completed"] == epochs and summary["global_step"] == 5 * epochs

TESTS = Path(__file__).parent


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (Python's json reads them; JSON does not have them)."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)




def _start_train_process(args, driver: str, log_dir: Path) -> subprocess.Popen:
    """`python -m distcls.train` (run by its real entry point, `train.cli`), after `driver`'s code;
    its stdout and stderr go to files in `log_dir`."""
    argv = [str(a) for a in args]
    script = f"import sys\n{driver}\nfrom distcls import train\nsys.argv = ['distcls.train', *{argv!r}]\ntrain.cli()\n"
    with open(log_dir / "stdout", "w") as stdout, open(log_dir / "stderr", "w") as stderr:
        return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=stdout, stderr=stderr, text=True,
                                env=child_env({"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}))


def _one_line(proc, prefix: str) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.startswith("distcls: ")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    return lines[0]


# no validation: eval forward 1 is the model check, 2 the (one) test batch, 3 the plots'
RUN = [*FAST, "model.name=stop_model:build", "train.epochs=1", "train.max_steps_per_epoch=4", "data.val_fraction=0",
       "data.eval_batch_size=4096"]

SECOND_SIGTERM = (
    "import os, signal\nfrom distcls.run import outputs as rundir\nrelease = rundir.RunDirLock.release\n"
    "def release_after_a_second_sigterm(self):\n    os.kill(os.getpid(), signal.SIGTERM)\n    release(self)\n"
    "rundir.RunDirLock.release = release_after_a_second_sigterm\n"
)

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
                self.runs[item.name] = (
                    out,
                    log_dir,
                    _start_train_process([f"run.out_dir={out}", *args], driver, log_dir),
                )

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
    _one_line(
        proc, f"distcls: done: {sig} arrived after the last training step; the run finished and everything is written"
    )
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
