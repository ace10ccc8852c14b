"""`python -m distcls.bench imagefolder [...]`, or the older modes `checkpoint|throughput|all` (legacy.py).

TEMPORARY scaffolding (see __init__.py): a registry of modes, each with add_arguments/run.
"""
from __future__ import annotations

import json
from typing import Sequence

from distcls.bench import imagefolder, legacy
from distcls.cli import ArgumentParser, exit_with

MODES = {"imagefolder": imagefolder}


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in MODES:
        return legacy.main(argv)
    mode = MODES[argv[0]]
    p = ArgumentParser(prog=f"python -m distcls.bench {argv[0]}", description=mode.__doc__.split("\n\n")[0])
    p.add_argument("--out", help="also write the JSON result to this file")
    mode.add_arguments(p)
    args = p.parse_args(argv[1:])
    text = json.dumps(mode.run(args), indent=2)
    print(text)
    if args.out:
        from distcls.io import atomic_write_text
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    exit_with(main)
