"""Where a run's outputs came from: versions, the source's git commit, the command line, the hosts.
Written into summary.json and every checkpoint (`provenance`), so a result can be traced and rerun."""
from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from typing import Optional

from distcls.runtime import dist


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_state(directory: str) -> dict:
    """{commit, dirty} of the git work tree holding `directory` (the working directory: where the
    configs and any plug-in code were taken from); nulls where there is none or git is missing."""
    try:
        commit = subprocess.run(
            ["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "-C", directory, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {
            "commit": commit.stdout.strip(),
            "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def collect(world_size: int) -> dict:
    """Collective (every rank: the host names are gathered); the git state is looked up on rank 0 only."""
    import torch

    hosts = dist.all_gather_object(socket.gethostname())
    main = dist.is_main_rank()
    return {
        # plain str: weights-only readable
        "distcls": _version("distcls"), "torch": str(torch.__version__), "torchvision": _version("torchvision"),
        "python": platform.python_version(), "cuda": None if torch.version.cuda is None else str(torch.version.cuda),
        "git": git_state(os.getcwd()) if main else None,
        "command": shlex.join(sys.argv), "cwd": os.getcwd(),
        "hosts": sorted(set(hosts)), "world_size": world_size,
    }
