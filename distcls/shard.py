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
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from distcls.cli import ArgumentParser, exit_with
from distcls.errors import UserError

# file suffix -> member extension; others become png
KEPT_FORMATS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
STAGING = ".distcls-partial"  # inside OUT: the shards are written here, then moved into OUT when every one is done


def _member(path: str, skip_bad: bool) -> tuple:
    """(extension, bytes) of one image file in a shard: its own bytes (JPEG, PNG, WebP), or decoded as
    training decodes it (images.read_image: CMYK, 16-bit, float, palette -> RGB) and written as PNG.
    (None, message) for a file that does not decode, with --skip-bad-images."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in KEPT_FORMATS:
        return KEPT_FORMATS[suffix], Path(path).read_bytes()
    from PIL import Image

    from distcls.data.transforms.images import BadImage, read_image
    try:
        pixels = read_image(path, 3)
    except BadImage as exc:
        if skip_bad:
            return None, str(exc)
        raise UserError(f"{exc}; delete or replace it, or pass --skip-bad-images") from None
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_split(table, out: Path, split: str, shard_size: int, seed: int, skip_bad: bool, skipped: list) -> dict:
    """One split's shards into `out`; returns {shard file name: samples}. Shards are cut by count only
    (webdataset's ShardWriter would also cut at 3 GB: its maxsize is lifted so the counts hold)."""
    import webdataset as wds
    order = np.random.default_rng(seed).permutation(len(table))
    counts: dict = {}
    digits = max(6, len(str(max(0, (len(table) - 1) // shard_size))))
    name = f"{split}-%0{digits}d.tar"
    pattern = str(out).replace("%", "%%") + "/" + name  # a folder name with % in it stays itself
    place = 0
    with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0) as sink:
        for i in order:
            path, label = table.path(int(i)), int(table.labels[int(i)])
            ext, data = _member(path, skip_bad)
            if ext is None:
                skipped.append(data)
                continue
            sink.write({"__key__": f"{place:09d}", ext: data, "cls": str(label).encode()})
            shard = name % (place // shard_size)
            counts[shard] = counts.get(shard, 0) + 1
            place += 1
    return counts


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(
        prog="python -m distcls.shard",
        description="Write an image folder as WebDataset shards (data.name=webdataset).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("root", help="the image folder: ROOT/train/<class>/..., ROOT/val/<class>/... (and optionally test/)")
    p.add_argument("out", help="an empty (or new) folder for the shards and shards.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the samples are written in")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out files that are not readable images (else: an error naming one)",
    )
    args = p.parse_args(argv)
    from distcls.data import folder_index

    root, out = Path(args.root), Path(args.out)
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    if not root.is_dir():
        raise UserError(
            f"{root} is not a directory; give the image folder's root (ROOT/train/<class>/, ROOT/val/<class>/)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out} is {'not a folder' if not out.is_dir() else 'not empty'}; give a new or empty folder for the shards"
        )
    # ROOT's shared index, else walked here and written nowhere
    index = folder_index.load_or_build(root, folder_index.location(root, None, None))
    if "val" not in index.tables:
        raise UserError(
            f"{root} has no val/ folder: data.name=webdataset trains on train shards and validates on val shards; "
            f"put the validation images in {root}/val/<class>/"
        )
    bad = [(split, i, why) for split, b in index.bad.items() for i, why in b.items()]
    if bad and not args.skip_bad_images:
        split, i, why = bad[0]
        raise UserError(
            f"image file {index.tables[split].path(i)}: {why}; delete or replace it, or pass --skip-bad-images"
        )
    for split, table in index.tables.items():
        if not len(table):
            folder = root / (index.train_dir if split == "train" else split)
            raise UserError(
                f"{folder} holds no images; put each class's images in {folder}/<class>/, or remove the folder"
            )
    created = not out.exists()
    staging = out / STAGING
    staging.mkdir(parents=True)
    counts, skipped = {}, [f"{index.tables[split].path(i)}: {why}" for split, i, why in bad]
    try:
        for split in index.tables:
            table = index.source_pairs(split)
            skip = set(index.bad.get(split, {}))
            if skip:
                table = table.select([i for i in range(len(table)) if i not in skip])
            counts[split] = write_split(
                table, staging, split, args.shard_size, args.seed, args.skip_bad_images, skipped
            )
            if not counts[split]:
                raise UserError(
                    f"every image of {root}'s {split} split is unreadable ({skipped[-1]}); nothing to write"
                )
        description = {
            "class_names": index.classes,
            "counts": {name: n for split in counts.values() for name, n in split.items()},
        }
        (staging / "shards.json").write_text(json.dumps(description, indent=1) + "\n")
        # shards.json last: its presence says "complete"
        for written in sorted(staging.iterdir(), key=lambda p: p.name == "shards.json"):
            os.replace(written, out / written.name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(out if created else staging, ignore_errors=True)  # nothing half-written stays behind
        raise
    for split, c in counts.items():
        names = sorted(c)
        first, last = names[0], names[-1]
        stem, digits = first.rsplit("-", 1)[0], len(first.rsplit("-", 1)[1]) - len(".tar")
        pattern = (
            f"{out.resolve()}/{stem}-{{{0:0{digits}d}..{len(names) - 1:0{digits}d}}}.tar"
            if len(names) > 1
            else str(out.resolve() / first)
        )
        print(
            f"{split}: {sum(c.values()):,} samples in {len(names)} shards ({first} .. {last}): "
            f"data.{split}_shards={pattern}"
        )
    left_out = f"; {len(skipped)} unreadable files left out (first: {skipped[0]})" if skipped else ""
    print(f"{len(index.classes)} classes; {out / 'shards.json'} holds their names and the shards' counts{left_out}")
    return 0


def cli() -> None:
    exit_with(main)


if __name__ == "__main__":
    cli()
