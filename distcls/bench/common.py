"""What the bench modes share: running distcls as a user would (subprocesses, real torchrun)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# ImageNet normalization, as torchvision's references use it: the bench's image pipelines normalize with it.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def module_cmd(module: str, args, nproc: int = 1) -> list:
    """`python -m module args`, under torchrun (one node, `nproc` processes) for nproc > 1."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable, *launcher, "-m", module, *args]


def train_cmd(args, nproc: int = 1) -> list:
    return module_cmd("distcls.train", args, nproc)


def run_quiet(cmd: list) -> float:
    """Run a child process (its stdout discarded): its seconds, or a UserError quoting its last stderr line."""
    from distcls.errors import UserError

    started = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise UserError(f"`{' '.join(cmd[-6:])}` exited {proc.returncode}: {last_line(proc.stderr)}")
    return time.perf_counter() - started


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def summary(out: Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def last_line(text: str) -> str:
    """The last non-empty line of a process's output ('' when there is none): what a failure quotes."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def run_train(args, nproc: int = 1) -> None:
    """`python -m distcls.train args` (torchrun for nproc > 1); a failure is a UserError quoting its error line."""
    from distcls.errors import UserError

    proc = subprocess.run(
        train_cmd(args, nproc), env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        reason = next((l for l in proc.stderr.splitlines() if l.startswith("distcls: error: ")), last_line(proc.stderr))
        raise UserError(f"distcls.train ({nproc} process{'es' if nproc > 1 else ''}) exited {proc.returncode}: "
                        f"{reason.removeprefix('distcls: error: ')[:500]}")


def machine() -> dict:
    """The machine a result was measured on (written into every result)."""
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info
