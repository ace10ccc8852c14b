"""Shared helpers: run distcls as a user would (subprocesses, real torchrun with gloo)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

# One intra-op thread for the runs made in this process, as in every subprocess (child_env sets
# OMP_NUM_THREADS=1): the suite's models and batches are tiny, and OpenMP threads of tiny ops only wait
# for each other; on a busy 2-core machine 44 in-process tests took 630 s with torch's default 2
# threads and 142 s with 1. In-process and subprocess runs then also sum in the same order (bitwise).
torch.set_num_threads(1)


def child_env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "SLURM_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # torch reads either: a user's MKL_NUM_THREADS=2 must not change the sums
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra or {})
    return env


def distcls_cmd(module: str, args, nproc: int = 1, torchrun_args=()) -> list:
    if nproc == 1 and not torchrun_args:
        return [sys.executable, "-m", f"distcls.{module}", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *torchrun_args,
            "-m", f"distcls.{module}", *args]


def run_distcls(module: str, args, nproc: int = 1, cwd=None, env=None, timeout: int = 900, torchrun_args=()):
    return subprocess.run(distcls_cmd(module, [str(a) for a in args], nproc, torchrun_args), cwd=cwd or ROOT,
                          env=child_env(env), capture_output=True, text=True, timeout=timeout)


def child_pids(pid: int) -> list:
    """The processes that `pid` started and that still run (from /proc; [] once it has ended)."""
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except OSError:  # it ended meanwhile
        return []


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process under it, if it still runs (a failed test's job must not
    train beside the next tests): torchrun's workers lead sessions of their own, so a process group
    kill would miss them. The children first, so none is re-parented out of reach."""
    if proc.poll() is not None:
        return

    def descendants(pid: int) -> list:
        return [d for c in child_pids(pid) for d in [*descendants(c), c]]

    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()


def load_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def train_at_world_sizes(tmp_path, args, sizes=(1, 2)) -> dict:
    """The same run at each world size: 1 in this process (the same run `python -m distcls.train`
    makes: one intra-op thread, the CPU), more under torchrun; FAST before `args` on both sides.
    {world size: its last.pt}."""
    import json
    checkpoints = {}
    for n in sizes:
        out = tmp_path / f"w{n}"
        if n == 1:
            train_in_process(out, *args)
        else:
            assert_ok(run_distcls("train", [f"run.out_dir={out}", "dist.device=cpu", *FAST, *args], nproc=n))
        assert json.loads((out / "summary.json").read_text())["world_size"] == n
        checkpoints[n] = load_ckpt(out / "checkpoints/last.pt")
    return checkpoints


def cli_in_process(capture, module, args) -> subprocess.CompletedProcess:
    """`python -m distcls.<module> args` (`module`: its name, or a `main` function) run in this process,
    through the same `run_cli` wrapper (no interpreter start-up: a few seconds each), as a finished
    process for assert_ok and assert_user_error. `capture`: pytest's capfd (what reaches file
    descriptors 1 and 2, C-level writes included) or capsys. Python warnings are shown in stderr as a
    fresh interpreter shows them (pytest would otherwise collect them aside), so a warning beside a
    `distcls: error:` line is seen. Tests about the process boundary itself use run_distcls."""
    import importlib
    import warnings

    from distcls.cli import run_cli

    main = importlib.import_module(f"distcls.{module}").main if isinstance(module, str) else module
    args = [str(a) for a in args]
    capture.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # the interpreter's default filters, not pytest's
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        code = run_cli(main, args)
    out = capture.readouterr()
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    return subprocess.CompletedProcess(args, code, out.out, out.err + shown)


@pytest.fixture(autouse=True)
def _like_a_fresh_process(monkeypatch, request):
    """In-process runs see what a subprocess of run_distcls sees (child_env): no launcher variables
    (a suite run inside a SLURM allocation or under torchrun is not a multi-rank launch), no GPU
    (CUDA_VISIBLE_DEVICES="" there; here torch.cuda.is_available() is False, except in the tests
    marked gpu), and torch's process-wide deterministic-algorithms flag back as it was after each
    test (--debug and run.deterministic turn it on)."""
    for name in list(os.environ):
        if name.startswith(("TORCHELASTIC_", "SLURM_")) or name in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
        ):
            monkeypatch.delenv(name)
    if request.node.get_closest_marker("gpu") is None:
        # the suite's CPU runs stay CPU runs on a GPU host
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


def assert_ok(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    )


def assert_user_error(proc, *fragments):
    """Exit 2, exactly one stderr line `distcls: error: ...` containing the fragments, no traceback."""
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("distcls: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    return lines[0]


def slurm_unavailable(what: str, exc: Exception):
    """A SLURM test that cannot run here: skipped with the reason, or failed under DISTCLS_REQUIRE_SLURM=1 (.ci/run)."""
    if os.environ.get("DISTCLS_REQUIRE_SLURM") == "1":
        pytest.fail(f"DISTCLS_REQUIRE_SLURM=1 but {what}: {exc}")
    pytest.skip(f"{what}: {str(exc).splitlines()[0]}")


def pytest_collection_finish(session):
    # A fresh machine installs SLURM (apt-get) in the background while the tests before
    # tests/test_slurm.py run; its cluster fixture waits for it (tests/slurm_cluster.py).
    import slurm_cluster
    slurm_cluster.install_in_background_for(session)


def pytest_unconfigure(config):
    import slurm_cluster
    if slurm_cluster.still_installing():
        print(f"\nnote: {slurm_cluster.still_installing()}", file=sys.stderr)


# Fast settings for runs on the bundled digits data.
FAST = ["log.every_steps=0", "data.batch_size=32", "log.plots=false"]


@pytest.fixture
def out_dir(tmp_path) -> Path:
    return tmp_path / "run"


def run_in_process(out_dir, *overrides, resume=None):
    """One single-process run through the real TrainingRun (no subprocess start-up cost): its
    summary, or `runner.Stopped` when a signal stopped it."""
    from distcls import config
    from distcls.runtime import dist
    from distcls.run.runner import TrainingRun

    # on the CPU, as run_distcls's
    cfg = config.load(None, [f"run.out_dir={out_dir}", "dist.device=cpu", *FAST, *overrides])
    env = dist.detect(cfg.dist.device, cfg.dist.backend)
    return TrainingRun(cfg, env, resume=resume).run()


def train_in_process(out_dir, *overrides, resume=None) -> dict:
    """`run_in_process` that must finish: its summary."""
    outcome = run_in_process(out_dir, *overrides, resume=resume)
    assert isinstance(outcome, dict), f"the run did not finish: {outcome}"
    return outcome


FINISHED_RUN_STEPS = ["train.max_steps_per_epoch=5"]  # of `finished_run`: a resume of a copy of it passes these too


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-epoch run of the default config (5 steps per epoch), trained once for every test
    file that reads one: last.pt, best.pt, epoch_0001.pt, epoch_0002.pt, metrics, summary. Read it
    only: a test that changes it works on a copy (shutil.copytree)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_in_process(out, *FINISHED_RUN_STEPS, "train.epochs=2")
    return out
