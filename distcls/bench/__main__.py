"""`python -m distcls.bench MODE [options] [--out FILE]`; `python -m distcls.bench MODE --help` per mode."""
from __future__ import annotations

import argparse
import json
from typing import Sequence

from distcls.bench import (
    augment, checkpoint, compare, datastart, gpu_check, imagefolder, reference, scaling, startup, throughput,
)
from distcls.cli import ArgumentParser, exit_with

# mode name -> module exposing add_arguments(parser) and run(args) -> dict (optionally render(result)).
MODES = {
    "checkpoint": checkpoint,
    "throughput": throughput,
    "compare": compare,
    "scaling": scaling,
    "startup": startup,
    "imagefolder": imagefolder,
    "datastart": datastart,
    "augment": augment,
    "reference": reference,
    "gpu": gpu_check,
}


def _summary_line(module) -> str:
    return (module.__doc__ or "").strip().split("\n")[0]


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m distcls.bench", description="Measurements behind distcls's performance claims."
    )
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=True, parser_class=ArgumentParser)
    for name, module in MODES.items():
        sub = modes.add_parser(name, help=_summary_line(module), description=module.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if args.out:
        from distcls.run.outputs import check_output_file
        check_output_file(args.out, "--out")  # before the measurement, not after it
    module = MODES[args.mode]
    result = module.run(args)
    text = json.dumps(result, indent=2)
    if hasattr(module, "render"):
        module.render(result)
    else:
        print(text)
    if args.out:
        from distcls.runtime.atomic_files import atomic_write_text
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    exit_with(main)
