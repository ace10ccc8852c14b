"""`python -m distcls.train --nproc_per_node N ...` (and evaluate): N ranks on this node through torch's
own elastic launch API (`torch.distributed.launcher.api`, what `torchrun --standalone` runs; no launcher
of our own), returning distcls's exit code: plain torchrun turns every failure into exit 1 and ~40
lines of its agent's ChildFailedError traceback after the worker's one `distcls: error:` line.

The exit code is rank 0's when it failed, else the first failed rank's; a rank killed by a signal
counts as 128 + the signal. The agent's own log lines are not shown (the workers' lines are).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from typing import Sequence


def strip_nproc(argv: Sequence[str]) -> tuple[int | None, list]:
    """(N of --nproc_per_node N or --nproc_per_node=N, the other arguments)."""
    rest, nproc, it = [], None, iter(argv)
    for arg in it:
        if arg == "--nproc_per_node":
            nproc = next(it, None)
        elif arg.startswith("--nproc_per_node="):
            nproc = arg.split("=", 1)[1]
        else:
            rest.append(arg)
            continue
        from distcls.errors import UserError
        if nproc is None or not re.fullmatch(r"[0-9]+", str(nproc)) or int(nproc) < 1:
            raise UserError(f"--nproc_per_node needs a number of processes >= 1, got {nproc!r}")
        nproc = int(nproc)
    return nproc, rest


def launch(module: str, argv: Sequence[str], nproc: int) -> int:
    """`python -m distcls.<module> argv` on `nproc` ranks of this node; distcls's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "RANK" in os.environ or "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from distcls.errors import UserError

        raise UserError(
            "--nproc_per_node starts the ranks itself: leave it out under torchrun or srun (they start them)"
        )
    options = {"min_nodes": 1, "max_nodes": 1, "nproc_per_node": nproc, "run_id": f"distcls-{uuid.uuid4().hex[:8]}",
               "rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0", "rdzv_configs": {"rank": 0}, "max_restarts": 0,
               "monitor_interval": 0.1,
               # a stop signal to this process reaches the ranks (they lead sessions of their own), SLURM's USR1
               # included, and they get the time a checkpoint takes before the agent would kill them
               "signals_to_handle": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "shutdown_timeout": 600}
    fields = getattr(LaunchConfig, "__dataclass_fields__", {})
    config = LaunchConfig(**{k: v for k, v in options.items() if k in fields})  # (older torch: without the last two)
    elastic = logging.getLogger("torch.distributed.elastic")
    level, omp = elastic.level, os.environ.get("OMP_NUM_THREADS")
    elastic.setLevel(logging.CRITICAL)
    if nproc > 1 and omp is None:
        os.environ["OMP_NUM_THREADS"] = "1"  # the ranks', as torchrun sets it: N processes sharing the cores
    try:
        elastic_launch(config, sys.executable)("-m", f"distcls.{module}", *argv)
        return 0
    except SignalException as exc:  # passed on to the ranks, which stopped (a checkpoint saved: their own lines say so)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        failed = (
            [codes[0]]
            if codes.get(0, 0) > 0
            else [c for _, c in sorted(codes.items()) if c > 0] or list(codes.values())
        )
        code = failed[0]
        return code if code >= 0 else 128 - code
    finally:
        elastic.setLevel(level)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
