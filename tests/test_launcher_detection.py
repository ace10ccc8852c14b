"""Which launcher started this process, read from the environment alone (no process group)."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from conftest import assert_user_error, cli_in_process
from distcls.runtime import dist
from distcls.errors import ConfigError, UserError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
                 "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST",
                 "SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE")
MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}  # torchrun always sets both


@pytest.fixture
def launch_env(monkeypatch):
    # distcls's own nodelist parser whatever this machine has installed (with scontrol on PATH, SLURM's
    # answer is the authority: test_nodelist tests both paths)
    monkeypatch.setenv("PATH", "")
    for name in LAUNCHER_VARS:
        # set, then delete: monkeypatch then restores each variable, also those detect() sets (MASTER_ADDR, MASTER_PORT)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def setenv(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))
    return setenv


def srun_task(rank, local_rank, ntasks, **extra):
    return {"SLURM_PROCID": rank, "SLURM_LOCALID": local_rank, "SLURM_NTASKS": ntasks, "SLURM_STEP_ID": 0,
            "SLURM_JOB_ID": 123456, "SLURM_JOB_NODELIST": "gpu[07-08]", **extra}


def test_no_launcher_is_one_process(launch_env):
    env = dist.detect("cpu")
    assert (env.launcher, env.rank, env.local_rank, env.world_size) == ("single", 0, 0, 1)


def test_torchrun_variables(launch_env):
    launch_env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1, **MASTER)
    env = dist.detect("cpu")
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.backend) == ("torchrun", 3, 1, 4, "gloo")


def test_torchrun_inside_an_srun_task_is_torchrun(launch_env):
    # multi_node.sbatch: srun starts one torchrun per node; its workers see both sets of variables
    launch_env(
        **srun_task(1, 0, 2, SLURM_NNODES=2, SLURM_NTASKS_PER_NODE=1), RANK=2, WORLD_SIZE=4, LOCAL_RANK=0, **MASTER
    )
    env = dist.detect("cpu")
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 2, 4)


def test_srun_tasks_are_ranks_and_rendezvous_on_the_first_node(launch_env):
    launch_env(**srun_task(3, 1, 4, SLURM_NNODES=2, SLURM_NTASKS_PER_NODE=2))
    env = dist.detect("cpu")
    assert (env.launcher, env.rank, env.local_rank, env.world_size) == ("slurm", 3, 1, 4)
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_one_srun_task_or_the_batch_shell_is_one_process(launch_env):
    launch_env(**srun_task(0, 0, 1))
    assert dist.detect("cpu").launcher == "single"
    launch_env(SLURM_NTASKS=2)
    del os.environ["SLURM_STEP_ID"]  # the batch script itself, before any srun
    assert dist.detect("cpu").launcher == "single"


@pytest.mark.parametrize("task, fragment", [
    (srun_task(2, 0, 2), "SLURM_PROCID=2"),
    (srun_task(1, 1, 4, SLURM_NNODES=2, SLURM_NTASKS_PER_NODE=1), "2 nodes x 1 tasks per node"),
    (srun_task(0, 0, "abc"), "SLURM_NTASKS='abc' is not an integer"),
    (srun_task(0, 0, 2, SLURM_JOB_NODELIST="[broken"), "SLURM_JOB_NODELIST='[broken'"),
])
def test_inconsistent_srun_layouts_are_clear_errors(launch_env, task, fragment):
    launch_env(**task)
    with pytest.raises(UserError) as info:
        dist.detect("cpu")
    assert fragment in str(info.value)


@pytest.mark.parametrize("nodelist, first", [("gpu[03-05,09],cpu1", "gpu03"), ("node17", "node17"),
                                             ("a-b[1-2]", "a-b1"), ("n[0012-0015]", "n0012")])
def test_first_host_of_a_nodelist(nodelist, first):
    assert dist.first_host(nodelist) == first


def test_bad_slurm_variable_is_one_error_line(tmp_path, launch_env, capsys):
    launch_env(**srun_task(0, 0, "abc"))
    proc = cli_in_process(capsys, "train", [f"run.out_dir={tmp_path}"])
    assert_user_error(proc, "SLURM_NTASKS='abc' is not an integer")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("values, expected", [
    ({"RANK": 0, "WORLD_SIZE": 1}, (0, 0, 1)),  # torchrun --nproc_per_node=1
    # after a restart
    ({"RANK": 5, "WORLD_SIZE": 8, "LOCAL_RANK": 1, "TORCHELASTIC_RESTART_COUNT": 2, **MASTER}, (5, 1, 8)),
    ({"RANK": 1, "WORLD_SIZE": 2, **MASTER}, (1, 0, 2)),  # no LOCAL_RANK: local rank 0
])
def test_torchrun_ranks(launch_env, values, expected):
    launch_env(**values)
    env = dist.detect("cpu")
    assert env.launcher == "torchrun" and (env.rank, env.local_rank, env.world_size) == expected
    assert env.is_main == (expected[0] == 0) and env.distributed == (expected[2] > 1)


@pytest.mark.parametrize(
    "values, name",
    [
        ({"RANK": "x", "WORLD_SIZE": 2}, "RANK"),
        ({"RANK": 0, "WORLD_SIZE": "2.0"}, "WORLD_SIZE"),
        ({"RANK": 0, "WORLD_SIZE": 2, "LOCAL_RANK": ""}, "LOCAL_RANK"),
    ],
)
def test_non_integer_torchrun_variable_is_a_clear_error(launch_env, values, name):
    launch_env(**values)
    with pytest.raises(UserError, match=f"environment variable {name}=.* is not an integer"):
        dist.detect("cpu")


def test_explicit_master_address_and_port_win_over_the_nodelist(launch_env):
    # the nodelist error says "set MASTER_ADDR explicitly": that works, even with a nodelist distcls cannot parse
    launch_env(**srun_task(1, 1, 2, SLURM_JOB_NODELIST="[broken"), MASTER_ADDR="10.0.0.7", MASTER_PORT=29511)
    env = dist.detect("cpu")
    assert (env.launcher, env.rank, env.world_size) == ("slurm", 1, 2)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.7", "29511")


def test_srun_without_a_nodelist_rendezvous_locally(launch_env):
    launch_env(**srun_task(0, 0, 2))
    del os.environ["SLURM_JOB_NODELIST"], os.environ["SLURM_JOB_ID"]
    dist.detect("cpu")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("localhost", "20000")


def test_debug_under_a_multi_process_launcher_is_a_config_error(launch_env):
    launch_env(RANK=0, WORLD_SIZE=2, **MASTER)
    with pytest.raises(ConfigError, match="--debug runs one process, but the launcher started 2"):
        dist.detect("cpu", debug=True)
    launch_env(RANK=0, WORLD_SIZE=1)
    assert dist.detect("cpu", debug=True).world_size == 1


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this node has N visible CUDA GPUs (torch.cuda only: nothing here touches torch.distributed)."""
    def visible(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return visible


@pytest.mark.parametrize("task, count, index", [
    ({"RANK": 3, "WORLD_SIZE": 4, "LOCAL_RANK": 1, **MASTER}, 2, 1),  # torchrun: local rank -> GPU index
    (srun_task(3, 1, 4, SLURM_NNODES=2, SLURM_NTASKS_PER_NODE=2), 2, 1),  # srun tasks seeing the node's GPUs
    (srun_task(3, 1, 4, SLURM_NNODES=2, SLURM_NTASKS_PER_NODE=2), 1, 0),  # srun bound one GPU per task
    ({}, 4, 0),  # one process
])
def test_each_rank_gets_its_gpu_and_nccl(launch_env, gpus, task, count, index):
    launch_env(**task)
    gpus(count)
    env = dist.detect("auto")
    assert (env.device, env.backend) == (torch.device("cuda", index), "nccl")
    assert dist.detect("cpu").device == torch.device("cpu") and dist.detect("cpu").backend == "gloo"


def test_more_processes_per_node_than_gpus_is_a_clear_error(launch_env, gpus):
    launch_env(RANK=2, WORLD_SIZE=3, LOCAL_RANK=2, **MASTER)
    gpus(2)
    with pytest.raises(UserError, match="local rank 2 has no GPU \\(this node has 2 visible\\)"):
        dist.detect("auto")


def test_cuda_or_nccl_asked_for_without_a_gpu_are_config_errors(launch_env, gpus):
    gpus(0)
    assert dist.detect("auto").device == torch.device("cpu")
    with pytest.raises(ConfigError, match="dist.device=cuda but no CUDA GPU is visible"):
        dist.detect("cuda")
    with pytest.raises(ConfigError, match="dist.backend=nccl needs CUDA GPUs"):
        dist.detect("auto", "nccl")


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"RANK": 1, "WORLD_SIZE": 1}, "RANK=1 must be in 0..0 (WORLD_SIZE=1)"),
        ({"RANK": -1, "WORLD_SIZE": 2, **MASTER}, "RANK=-1 must be in 0..1"),
        ({"RANK": 0, "WORLD_SIZE": 0}, "WORLD_SIZE=0 must be >= 1"),
        ({"RANK": 2, "WORLD_SIZE": 4, "LOCAL_RANK": 3, **MASTER}, "LOCAL_RANK=3 does not fit RANK=2, WORLD_SIZE=4"),
        ({"RANK": 3, "WORLD_SIZE": 4, "LOCAL_RANK": 2, "LOCAL_WORLD_SIZE": 2, **MASTER}, "LOCAL_RANK=2 does not fit"),
        ({"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": -1, **MASTER}, "LOCAL_RANK=-1 does not fit"),
        ({"RANK": 0, "WORLD_SIZE": 2}, "MASTER_ADDR and MASTER_PORT are not set"),
        ({"RANK": 0, "WORLD_SIZE": 2, "MASTER_ADDR": "10.0.0.7"}, "MASTER_PORT is not set"),
        (
            {"RANK": 0, "WORLD_SIZE": 2, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": 70000},
            "MASTER_PORT=70000 is not a TCP port",
        ),
        (
            {"RANK": 0, "WORLD_SIZE": 2, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "http"},
            "MASTER_PORT='http' is not an integer",
        ),
        (srun_task(1, 1, 2, MASTER_PORT=0), "MASTER_PORT=0 is not a TCP port"),
    ],
)
def test_impossible_launcher_variables_are_clear_errors(launch_env, values, fragment):
    launch_env(**values)
    with pytest.raises(UserError) as info:
        dist.detect("cpu")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"RANK": 1, "WORLD_SIZE": 1}, "RANK=1 must be in 0..0"),
        ({"RANK": -1, "WORLD_SIZE": 2}, "RANK=-1 must be in 0..1"),
        ({"RANK": 0, "WORLD_SIZE": 0}, "WORLD_SIZE=0 must be >= 1"),
        ({"RANK": 0, "WORLD_SIZE": 2}, "MASTER_ADDR and MASTER_PORT are not set"),
    ],
)
def test_impossible_launcher_variables_are_one_error_line(launch_env, tmp_path, capsys, values, fragment):
    # before: a non-finite-loss abort (exit 4), tracebacks, or a silent wait for dist.timeout_s
    # (in process: the same `python -m distcls.train` path, run_cli + train.main, without a new interpreter)
    from distcls import train
    from distcls.cli import run_cli
    launch_env(**values)
    code = run_cli(train.main, [f"run.out_dir={tmp_path / 'run'}"])
    assert_user_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), fragment)
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_rank_whose_peers_never_come_ends_in_one_error_line(launch_env, tmp_path, capsys):
    # before: a silent wait, then a DistStoreError traceback
    # (in process: the `python -m distcls.train` path, run_cli + train.main, and torch's real rendezvous store)
    from distcls import train
    from distcls.cli import run_cli
    port = _free_port()
    launch_env(RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    code = run_cli(train.main, [f"run.out_dir={tmp_path / 'run'}", "dist.timeout_s=1"])
    assert_user_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err),
                      f"rank 0 waiting for 1 more process at 127.0.0.1:{port}: the process group did not form within "
                      "dist.timeout_s=1 s", "start all 2 processes with the same MASTER_ADDR and MASTER_PORT")
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_a_waiting_rank_says_what_it_waits_for(launch_env, tmp_path, capsys, monkeypatch):
    """After _WaitNotice.AFTER_S of waiting (5 s; 0.2 s here, in process) a rank says once what it
    waits for; dist.timeout_s later the error line follows."""
    from distcls import train
    from distcls.cli import run_cli
    monkeypatch.setattr(dist._WaitNotice, "AFTER_S", 0.2)
    # the wait's end waits for the notice (its timer thread), however late a loaded machine runs it
    monkeypatch.setattr(dist._WaitNotice, "cancel", lambda notice: notice._timer.join())
    port = _free_port()
    launch_env(RANK=0, WORLD_SIZE=3, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    code = run_cli(train.main, [f"run.out_dir={tmp_path / 'run'}", "dist.timeout_s=1", "data.batch_size=63"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 2, lines
    assert lines[0] == f"distcls: rank 0 waiting for 2 more processes at 127.0.0.1:{port} (dist.timeout_s=1)"
    assert lines[1].startswith(
        f"distcls: error: rank 0 waiting for 2 more processes at 127.0.0.1:{port}: the process group did not form"
    )
