"""`python -m distcls.data.index ROOT [--out FILE] [--rebuild]`: index an image folder ahead of time.

Builds the file list and the per-file check of ROOT (folder_index.py) once, for every run on that
data: by default into ROOT/.distcls_index.npz, which runs with data.root=ROOT use when data.index
is null; `--out FILE` writes it elsewhere (a read-only dataset: point runs at it with
data.index=FILE). Under torchrun the ranks divide the check. An index that is current is kept
(`--rebuild` makes it again, e.g. after files were rewritten in place under the same names).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from distcls.cli import ArgumentParser, exit_with
from distcls.errors import UserError


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(
        prog="python -m distcls.data.index",
        description="Index an image folder (data.name=imagefolder) once, for every run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("root", help="the image folder: ROOT/train/<class>/... (and val/, test/), or ROOT/<class>/...")
    p.add_argument("--out", help="where to write the index (default: ROOT/.distcls_index.npz)")
    p.add_argument("--rebuild", action="store_true", help="index again even when the index is current")
    args = p.parse_args(argv)
    from distcls.data import folder_index
    from distcls.runtime import dist

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(
            f"{root} is not a directory; give the image folder's root (ROOT/train/<class>/ or ROOT/<class>/)"
        )
    out = Path(args.out) if args.out else root / folder_index.SHARED_NAME
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist; create it first")
    env = dist.detect("cpu")
    dist.init(env, 1800)
    try:
        index = folder_index.load_or_build(
            root, out, note=print if env.is_main else (lambda msg: None), rebuild=args.rebuild, save_to=out
        )
        if env.is_main:
            bad = sum(len(b) for b in index.bad.values())
            splits = ", ".join(f"{split} {len(t):,}" for split, t in index.tables.items())
            print(
                f"{len(index.classes)} classes; files: {splits}; {bad} unusable"
                + (" (data.skip_bad_images=true leaves them out)" if bad else "")
            )
            if not out.is_file():
                raise UserError(
                    f"the index could not be written to {out}; choose a writable --out and point runs at it with "
                    "data.index=FILE"
                )
    finally:
        dist.teardown()
    return 0


def cli() -> None:
    exit_with(main)


if __name__ == "__main__":
    cli()
