"""The sbatch scripts in slurm/ on a real local SLURM cluster (tests/slurm_cluster.py): training on
1 node x 2 processes, 2 nodes x 1 process and 2 srun tasks, equal weights across layouts, a
requeue on SIGUSR1 that resumes and ends as an uninterrupted run would, and bad submissions that
fail in seconds with the one-line error.

The cluster's jobs cost CPU, which is what these tests' time is made of: the three default-config
jobs run at once, the 2-node and srun-tasks ones are requeued on the way (their SIGUSR1 comes when
their first checkpoint is written) and end with the same weights as the 1-node job that was never
stopped; the three bad submissions run at once too.

Needs root (the daemons run as root; Debian's packages are installed when missing). Elsewhere these
tests are skipped, with the reason; with DISTCLS_REQUIRE_SLURM=1 (as .ci/run sets) they fail instead.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, child_env, load_ckpt, max_weight_diff, slurm_unavailable
from slurm_cluster import ClusterUnavailable, LocalSlurm

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# How each script is submitted on this CPU-only cluster (2 fake nodes of 2 CPUs): 2 ranks in all.
LAYOUTS = {
    "single_node": (["--cpus-per-task=2"], {"NPROC_PER_NODE": "2"}, "torchrun"),
    "multi_node": (["--cpus-per-task=1"], {"NPROC_PER_NODE": "1"}, "torchrun"),
    "srun_tasks": (["--ntasks-per-node=2", "--cpus-per-task=1"], {}, "slurm"),
}
# Plots are not what these tests are about (tests/test_outputs.py checks them); they cost CPU at each run's end.
QUIET = ["log.every_steps=0", "log.plots=false"]
DEFAULT_EPOCHS = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["train"]["epochs"]
NEVER_STOPPED = "single_node"  # the reference the requeued jobs must end equal to
REQUEUED = ("multi_node", "srun_tasks")


@pytest.fixture(scope="module")
def cluster():
    # a short path: munge's socket path must fit in a unix socket address (108 bytes)
    root = Path(tempfile.mkdtemp(prefix="distcls-slurm-", dir="/tmp"))
    try:
        slurm = LocalSlurm(root).start()
    except ClusterUnavailable as exc:
        slurm_unavailable("the local SLURM cluster did not start", exc)
    yield slurm
    slurm.stop()


class Job:
    def __init__(self, cluster: LocalSlurm, job_id: str, log: Path):
        self.cluster, self.id, self.log = cluster, job_id, log
        self.submitted = time.monotonic()
        self.submitted_at = datetime.datetime.now()
        self.info: dict = {}
        self.signalled_at: datetime.datetime | None = None  # when the test sent SIGUSR1 to its batch shell
        self.signal_problem = ""  # why it was not sent

    def seconds_to_first_step(self) -> float:
        """From sbatch to rank 0's first console line (printed just before the first step)."""
        m = re.search(r"^\[(\d\d:\d\d:\d\d)\] distcls: ", self.log_text(), re.M)
        first = datetime.datetime.combine(self.submitted_at.date(), datetime.time.fromisoformat(m.group(1)))
        return (first - self.submitted_at).total_seconds()

    def wait(self, timeout: float = 600) -> dict:
        self.info = self.cluster.wait_state(self.id, FINISHED, timeout)
        return self.info

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def submit(cluster: LocalSlurm, script: str, log_dir: Path, args, sbatch_opts=(), env=None) -> Job:
    bin_dir = str(Path(sys.executable).parent)
    job_env = cluster.env(child_env({"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **(env or {})}))
    log = log_dir / f"{script}.out"
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--time=15", f"--output={log}", *sbatch_opts,
           f"slurm/{script}.sbatch", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return Job(cluster, proc.stdout.strip().split(";")[0], log)


def submit_layout(cluster, script, log_dir, args, env=None) -> Job:
    opts, layout_env, _ = LAYOUTS[script]
    return submit(cluster, script, log_dir, args, opts, {**layout_env, **(env or {})})


def pause_at_first_checkpoint(mark: Path) -> dict:
    """The environment of a job whose rank 0 waits after its first checkpoint until a stop signal
    reaches it (tests/pause_hook; `mark` tells the requeued process not to wait): the requeue does
    not race the end of the training, however loaded the machine is."""
    return {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "pause_hook"), str(ROOT)]),
        "DISTCLS_TEST_PAUSE_MARK": str(mark),
    }


def _signal_at_first_checkpoint(cluster: LocalSlurm, jobs: dict, base: Path, timeout: float) -> None:
    """SIGUSR1 to each job's batch shell (as `#SBATCH --signal=B:USR1@180` sends it) as soon as its
    run.out_dir (base/<script>) holds a checkpoint: a job that is training (and waits there for the
    signal: pause_at_first_checkpoint). Why a job could not be signalled is left in its
    signal_problem, for the requeue test to report."""
    pending = dict(jobs)
    deadline = time.monotonic() + timeout
    while pending:
        for script, job in list(pending.items()):
            if (base / script / "checkpoints" / "last.pt").exists():
                job.signalled_at = datetime.datetime.now()
                cluster.run("scancel", "--signal=USR1", "--batch", job.id)
                del pending[script]
                continue
            info = cluster.job_state(job.id)
            if info.get("JobState") in FINISHED:
                job.signal_problem = f"the job ended before its first checkpoint: {info}\n{job.log_text()[-4000:]}"
            elif time.monotonic() > deadline:
                job.signal_problem = f"no checkpoint within {timeout:.0f} s: {info}\n{job.log_text()[-4000:]}"
            else:
                continue
            del pending[script]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def default_runs(cluster, tmp_path_factory):
    """The default config through each script, submitted together; the REQUEUED ones are signalled
    once their first checkpoint is written, so they requeue once and resume."""
    base = tmp_path_factory.mktemp("slurm_default")
    jobs = {
        s: submit_layout(
            cluster,
            s,
            base,
            ["configs/default.yaml", f"run.out_dir={base / s}", *QUIET],
            pause_at_first_checkpoint(base / f"{s}.paused") if s in REQUEUED else None,
        )
        for s in LAYOUTS
    }
    _signal_at_first_checkpoint(cluster, {s: jobs[s] for s in REQUEUED}, base, timeout=300)
    for job in jobs.values():
        job.wait()
    return base, jobs


@pytest.mark.parametrize("script", list(LAYOUTS))
def test_script_trains_the_default_config_on_two_ranks(default_runs, script):
    base, jobs = default_runs
    job = jobs[script]
    assert job.info["JobState"] == "COMPLETED" and job.info["ExitCode"] == "0:0", job.log_text()[-4000:]
    summary = json.loads((base / script / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["test_acc"] >= 0.95
    assert summary["test_count"] == 180
    assert f"world 2 ({LAYOUTS[script][2]}, cpu, gloo)" in job.log_text()
    print(f"{script}: sbatch -> first training step {job.seconds_to_first_step():.0f} s (3 jobs submitted at once)")


def test_one_node_two_nodes_and_srun_tasks_reach_the_same_weights(default_runs):
    # The default cnn3 has no BatchNorm (LeNet, as the issue asks, needs 16 px; the digits have 8).
    # The 2-node and srun-tasks jobs were requeued on the way (the test below checks that part).
    base, _ = default_runs
    weights = {s: load_ckpt(base / s / "checkpoints" / "last.pt")["model"] for s in LAYOUTS}
    diffs = {other: max_weight_diff(weights["single_node"], weights[other]) for other in ("multi_node", "srun_tasks")}
    print(f"max abs weight difference from the 1-node x 2 run: {diffs}")
    assert all(d <= 1e-5 for d in diffs.values()), diffs


@pytest.mark.parametrize("script", REQUEUED)
def test_usr1_saves_requeues_once_and_the_job_finishes_as_if_never_stopped(default_runs, script):
    base, jobs = default_runs
    job, reference = jobs[script], jobs[NEVER_STOPPED]
    assert job.signalled_at is not None, job.signal_problem
    info, log = job.info, job.log_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-5000:]
    assert info["Restarts"] == "1", info
    assert log.count("distcls-slurm: requeueing job") == 1, log[-5000:]
    assert "stopped by SIGTERM; checkpoint saved to" in log
    assert "resumed from" in log and "restart 1 on" in log
    assert "Error in sitecustomize" not in log  # (python runs on without a broken hook)
    # it waited at its first checkpoint (epoch 1's end) until the signal came
    assert (base / f"{script}.paused").exists()
    assert "at epoch 2, step 1 of the epoch" in log  # so it stopped at the next step
    resumed = datetime.time.fromisoformat(re.findall(r"^\[(\d\d:\d\d:\d\d)\] resumed from", log, re.M)[0])
    round_trip = (datetime.datetime.combine(job.signalled_at.date(), resumed) - job.signalled_at).total_seconds()
    print(f"{script}: requeue round trip (signal -> training resumed) {round_trip:.0f} s")

    records = [json.loads(l) for l in (base / script / "metrics.jsonl").read_text().splitlines()]
    train_epochs = [r["epoch"] for r in records if r["split"] == "train"]
    assert train_epochs == list(range(1, DEFAULT_EPOCHS + 1)), train_epochs
    assert [r["split"] for r in records].count("test") == 1

    assert reference.info["Restarts"] == "0" and "resumed from" not in reference.log_text(), reference.info
    weights = {s: load_ckpt(base / s / "checkpoints" / "last.pt")["model"] for s in (script, NEVER_STOPPED)}
    diff = max_weight_diff(weights[script], weights[NEVER_STOPPED])
    assert diff <= 1e-6, f"max abs weight difference from the never-stopped {NEVER_STOPPED} job: {diff}"


@pytest.fixture(scope="module")
def bad_submissions(cluster, tmp_path_factory):
    """Submissions that must fail, submitted together: {name: (its Job, its run.out_dir)}."""
    base = tmp_path_factory.mktemp("slurm_bad")
    runs = {"missing_config": ("single_node", ["configs/no_such.yaml"])}
    for script in ("single_node", "srun_tasks"):
        runs[f"bad_override_{script}"] = (
            script,
            ["configs/default.yaml", "optim.lr=fast", f"run.out_dir={base / f'bad_override_{script}' / 'run'}"],
        )
    jobs = {}
    for name, (script, args) in runs.items():
        (base / name).mkdir()
        jobs[name] = (submit_layout(cluster, script, base / name, args), base / name / "run")
    for job, _ in jobs.values():
        job.wait(timeout=240)
    return jobs


def test_missing_config_fails_the_job_with_one_error_line(bad_submissions):
    job, _ = bad_submissions["missing_config"]
    info = job.info
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    errors = [l for l in job.log_text().splitlines() if l.startswith("distcls: error: ")]
    assert len(errors) == 1 and "configs/no_such.yaml: config file not found" in errors[0], job.log_text()


@pytest.mark.parametrize("script", ["single_node", "srun_tasks"])
def test_bad_override_fails_the_job_in_seconds(bad_submissions, script):
    job, out_dir = bad_submissions[f"bad_override_{script}"]
    info = job.info
    assert info["JobState"] == "FAILED", info
    errors = [l for l in job.log_text().splitlines() if l.startswith("distcls: error: ")]
    assert len(errors) == 1 and "optim.lr" in errors[0], job.log_text()[-4000:]
    assert not out_dir.exists()
