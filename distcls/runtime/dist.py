"""Where am I running? torchrun, SLURM srun tasks, or a single process.

This is the only module that initializes or tears down torch.distributed. It also holds the
few collective helpers the rest of the code uses (each says "Collective": call it on every rank),
so they all behave the same with one process (no process group: the helpers are identities).
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from distcls.runtime import nodelist as nodelist_mod
from distcls.errors import ConfigError, UserError


@dataclass(frozen=True)
class DistEnv:
    launcher: str  # "single" | "torchrun" | "slurm"
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise UserError(
            f"environment variable {name}={os.environ[name]!r} is not an integer; unset it or fix the launcher"
        ) from None


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist, as SLURM expands it: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    return nodelist_mod.hostnames(nodelist)[0]


def _is_srun_rank() -> bool:
    """One of several tasks of an srun step (torchrun's variables, checked first, win over these:
    a single srun task that runs torchrun is not an srun-launched rank)."""
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ and "SLURM_NTASKS" in os.environ \
        and _int_env("SLURM_NTASKS") > 1


def _slurm_layout() -> tuple:
    """(rank, world size, local rank) of an srun task, checked for consistency."""
    rank, world, local_rank = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS"), _int_env("SLURM_LOCALID")
    if not (0 <= rank < world and 0 <= local_rank < world):
        raise UserError(
            f"inconsistent srun layout: SLURM_PROCID={rank}, SLURM_LOCALID={local_rank}, SLURM_NTASKS={world}; "
            "start distcls with srun inside the allocation (one task per GPU)"
        )
    per_node, nodes = os.environ.get("SLURM_NTASKS_PER_NODE", ""), os.environ.get("SLURM_NNODES", "")
    if per_node.isdigit() and nodes.isdigit() and int(per_node) * int(nodes) != world:
        raise UserError(
            f"inconsistent srun layout: {world} tasks (SLURM_NTASKS) but {nodes} nodes x {per_node} tasks per node; "
            "make --ntasks equal --nodes x --ntasks-per-node"
        )
    return rank, world, local_rank


def _cuda_index(launcher: str, local_rank: int) -> int:
    count = torch.cuda.device_count()
    if launcher == "slurm" and count == 1:
        return 0  # srun bound this task to one GPU (--gpus-per-task=1 / gpu-bind): it is the only one visible
    if local_rank >= count:
        raise UserError(
            f"local rank {local_rank} has no GPU (this node has {count} visible); start at most that many processes "
            "per node (torchrun --nproc_per_node, or srun --ntasks-per-node equal to --gpus-per-node)"
        )
    return local_rank


def _torchrun_layout() -> tuple:
    """(rank, world size, local rank) from torchrun-style variables (torchrun, or set by hand), checked:
    a rank outside the world, or a world without a rendezvous address, is a launch mistake."""
    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    local_rank = _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    fix = "start distcls with torchrun (it sets these), or unset RANK/WORLD_SIZE/LOCAL_RANK to run one process"
    if world < 1:
        raise UserError(f"environment variable WORLD_SIZE={world} must be >= 1; {fix}")
    if not 0 <= rank < world:
        raise UserError(f"environment variable RANK={rank} must be in 0..{world - 1} (WORLD_SIZE={world}); {fix}")
    local_world = _int_env("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world
    if not 0 <= local_rank < min(local_world, world) or local_rank > rank:
        raise UserError(f"environment variable LOCAL_RANK={local_rank} does not fit RANK={rank}, WORLD_SIZE={world}"
                        f"{f', LOCAL_WORLD_SIZE={local_world}' if 'LOCAL_WORLD_SIZE' in os.environ else ''}; {fix}")
    if world > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise UserError(
                f"RANK={rank}, WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                "not set: the ranks cannot find each other; set MASTER_ADDR and MASTER_PORT (the address and a free "
                "port of rank 0's host), or start distcls with torchrun"
            )
        _master_port()
    return rank, world, local_rank


def _master_port() -> int:
    port = _int_env("MASTER_PORT")
    if not 1 <= port <= 65535:
        raise UserError(
            f"environment variable MASTER_PORT={port} is not a TCP port (1..65535); set a free port of rank 0's host"
        )
    return port


def detect(device_pref: str = "auto", backend_pref: str = "auto", debug: bool = False) -> DistEnv:
    """Read the launcher's environment; no process group is created here."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "torchrun"
        rank, world, local_rank = _torchrun_layout()
    elif _is_srun_rank():
        launcher = "slurm"  # srun started one task per GPU
        rank, world, local_rank = _slurm_layout()
        # the user's MASTER_ADDR/MASTER_PORT win, and then the nodelist and job id are not even parsed
        if "MASTER_PORT" in os.environ:
            _master_port()
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = first_host(os.environ.get("SLURM_JOB_NODELIST", "localhost"))
        if "MASTER_PORT" not in os.environ:
            job_id = _int_env("SLURM_JOB_ID") if "SLURM_JOB_ID" in os.environ else 0
            os.environ["MASTER_PORT"] = str(20000 + job_id % 20000)
    else:
        launcher, rank, world, local_rank = "single", 0, 1, 0
    if debug and world > 1:
        raise ConfigError(
            f"--debug runs one process, but the launcher started {world}; run `python -m distcls.train --debug ...` "
            "without torchrun/srun"
        )

    has_cuda = torch.cuda.is_available()
    if device_pref == "cuda" and not has_cuda:
        raise ConfigError("dist.device=cuda but no CUDA GPU is visible; use dist.device=auto or cpu")
    use_cuda = has_cuda and device_pref != "cpu"
    if use_cuda:
        device = torch.device("cuda", _cuda_index(launcher, local_rank))
    else:
        device = torch.device("cpu")
    backend = backend_pref if backend_pref != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("dist.backend=nccl needs CUDA GPUs; use dist.backend=gloo (or auto) on CPU")
    return DistEnv(launcher, rank, local_rank, world, device, backend)


def _bind_world_defaults_early() -> None:
    """torch.distributed.nn.functional binds `group.WORLD` as a default argument when it is first
    imported (DDP's constructor imports it): imported after init_process_group, ten functions keep
    the live process group for the rest of the process, so destroy_process_group cannot free it and
    gloo's worker and socket-loop threads run on into interpreter shutdown, where a rank was seen to
    abort ("terminate called without an active exception") after a finished run. Imported here,
    before any group exists, those defaults are None (the default group, looked up at call time)."""
    import torch.distributed.nn.functional  # noqa: F401


def init(env: DistEnv, timeout_s: int) -> None:
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.distributed and not tdist.is_initialized():
        _bind_world_defaults_early()
        kwargs = {"device_id": env.device} if env.backend == "nccl" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        # torch's own env:// rendezvous store, with keys scoped to this torchrun attempt: after a
        # worker restart the agent's store still holds the dead attempt's gloo addresses, and a
        # rank that read one of those failed with "connectFullMesh ... Connection refused".
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        more = f"{env.world_size - 1} more process{'es' if env.world_size > 2 else ''}"
        waiting = f"rank {env.rank} waiting for {more} at {where}"
        # torchrun's agent started every rank itself and reports a rank that fails: no notice there
        notice = _WaitNotice(f"distcls: {waiting} (dist.timeout_s={timeout_s})", timeout_s,
                             enabled="TORCHELASTIC_RUN_ID" not in os.environ)
        try:
            store, _, _ = next(tdist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=timeout))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            tdist.init_process_group(
                backend=env.backend, store=tdist.PrefixStore(f"distcls/attempt_{attempt}", store),
                rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs)
        except tdist.DistError as exc:
            reason = " ".join(str(exc).split("\n")[0].split())[:200]
            raise UserError(
                f"{waiting}: the process group did not form within dist.timeout_s={timeout_s} s ({reason}); "
                f"start all {env.world_size} processes with the same MASTER_ADDR and MASTER_PORT "
                "(torchrun does), or raise dist.timeout_s"
            ) from None
        finally:
            notice.cancel()


class _WaitNotice:
    """Says once on stderr what a rank waits for, when forming the process group takes longer than
    `AFTER_S`: a rank started by hand, or an srun task whose peers are late. Not under torchrun,
    whose agent starts the ranks together and reports the one that fails (a rank slow to start on
    a loaded node would only add a line to every run's output). A short dist.timeout_s ends in
    the error line instead."""
    AFTER_S = 5.0

    def __init__(self, message: str, timeout_s: int, enabled: bool = True):
        self._timer = None
        if enabled and timeout_s > 2 * self.AFTER_S:
            self._timer = threading.Timer(self.AFTER_S, lambda: print(message, file=sys.stderr, flush=True))
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def barrier() -> None:
    """Collective: every rank waits here for the others."""
    if active():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Collective: sum across ranks (in place) and return it; identity in a single process.
    Queued like a kernel: it does not make the host wait for the device."""
    if active():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective: True on every rank if `flag` is True on at least one (a host read: off the step path)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def broadcast_object(obj, src: int = 0):
    """Collective: rank `src`'s picklable `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def rank_and_world() -> tuple:
    """(this rank, the world size) of the process group; (0, 1) without one."""
    return (tdist.get_rank(), tdist.get_world_size()) if active() else (0, 1)


def all_gather_object(obj) -> list:
    """Collective: every rank's picklable `obj`, in rank order, on every rank ([obj] in a single process)."""
    if not active():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def average_buffers(module: torch.nn.Module) -> None:
    """Collective: average floating-point buffers (BatchNorm running stats) so every rank evaluates
    and saves the same model. The training run calls it once per epoch end (runner._end_epoch)."""
    if not active():
        return
    world = tdist.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
            buf.div_(world)


def is_main_rank() -> bool:
    return not active() or tdist.get_rank() == 0
