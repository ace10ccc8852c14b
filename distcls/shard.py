"""`python -m distcls.shard ROOT OUT [--shard-size N]`: write an image folder as WebDataset shards.

ROOT is an image folder as data.name=imagefolder reads it (ROOT/train/<class>/..., ROOT/val/<class>/...,
optionally ROOT/test/<class>/...). Each split becomes OUT/<split>-000000.tar, ... of --shard-size
samples, written by webdataset's ShardWriter, in a seeded shuffled order (a shard holds many
classes, so reading shards in turn gives mixed batches); each sample is the image file's bytes as
they are (jpg, png, webp; other formats re-encoded as PNG) and its label as `cls`. OUT/shards.json
holds the class names and each shard's number of samples: runs read it instead of counting.
Then train with the lines it prints (data.name=webdataset data.train_shards=... data.val_shards=...).
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from distcls.cli import ArgumentParser, exit_with
from distcls.errors import UserError

KEPT_FORMATS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}  # file suffix -> member extension; others become png


def _member(path: str) -> tuple:
    """(extension, bytes) of one image file in a shard."""
    suffix = Path(path).suffix.lower().lstrip(".")
    data = Path(path).read_bytes()
    if suffix in KEPT_FORMATS:
        return KEPT_FORMATS[suffix], data
    from PIL import Image
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(data)) as img:
        img.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_split(table, out: Path, split: str, shard_size: int, seed: int) -> dict:
    """One split's shards; returns {shard file name: samples}."""
    import webdataset as wds
    order = np.random.default_rng(seed).permutation(len(table))
    counts: dict = {}
    digits = max(6, len(str(max(0, (len(table) - 1) // shard_size))))
    pattern = str(out / f"{split}-%0{digits}d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for place, i in enumerate(order):
            path, label = table.path(int(i)), int(table.labels[int(i)])
            ext, data = _member(path)
            sink.write({"__key__": f"{place:09d}", ext: data, "cls": str(label).encode()})
            name = Path(pattern % (place // shard_size)).name
            counts[name] = counts.get(name, 0) + 1
    return counts


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m distcls.shard", description="Write an image folder as WebDataset shards (data.name=webdataset).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("root", help="the image folder: ROOT/train/<class>/..., ROOT/val/<class>/... (and optionally test/)")
    p.add_argument("out", help="an empty (or new) folder for the shards and shards.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the samples are written in")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out files that are not readable images (else: an error naming one)")
    args = p.parse_args(argv)
    from distcls.data import folder_index

    root, out = Path(args.root), Path(args.out)
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; give the image folder's root (ROOT/train/<class>/, ROOT/val/<class>/)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} is {'not a folder' if not out.is_dir() else 'not empty'}; give a new or empty folder for the shards")
    index = folder_index.load_or_build(root, folder_index.location(root, None, None))  # ROOT's shared index, else walked here and written nowhere
    if "val" not in index.tables:
        raise UserError(f"{root} has no val/ folder: data.name=webdataset trains on train shards and validates on val shards; "
                        f"put the validation images in {root}/val/<class>/")
    bad = [(split, i, why) for split, b in index.bad.items() for i, why in b.items()]
    if bad and not args.skip_bad_images:
        split, i, why = bad[0]
        raise UserError(f"image file {index.tables[split].path(i)}: {why}; delete or replace it, or pass --skip-bad-images")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in index.tables:
        table = index.source_pairs(split)
        skip = set(index.bad.get(split, {}))
        if skip:
            table = table.select([i for i in range(len(table)) if i not in skip])
        counts[split] = write_split(table, out, split, args.shard_size, args.seed)
    description = {"class_names": index.classes, "counts": {name: n for split in counts.values() for name, n in split.items()}}
    (out / "shards.json").write_text(json.dumps(description, indent=1) + "\n")
    for split, c in counts.items():
        names = sorted(c)
        first, last = names[0], names[-1]
        stem, digits = first.rsplit("-", 1)[0], len(first.rsplit("-", 1)[1]) - len(".tar")
        pattern = f"{out.resolve()}/{stem}-{{{0:0{digits}d}..{len(names) - 1:0{digits}d}}}.tar" if len(names) > 1 else str(out.resolve() / first)
        print(f"{split}: {sum(c.values()):,} samples in {len(names)} shards ({first} .. {last}): data.{split}_shards={pattern}")
    skipped = f"; {len(bad)} unreadable files left out" if bad else ""
    print(f"{len(index.classes)} classes; {out / 'shards.json'} holds their names and the shards' counts{skipped}")
    return 0


def cli() -> None:
    exit_with(main)


if __name__ == "__main__":
    cli()
