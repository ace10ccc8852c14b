"""`python -m distcls.predict --checkpoint P IMAGE... [--top-k K]`: classify image files.

Each image is decoded like the evaluation data (shorter side resized to data.eval_resize, center
crop of the model's input size, the checkpoint's channels and normalization). One line per image:
`path<TAB>label<TAB>probability` (and the next K-1 guesses with --top-k).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from distcls.cli import ArgumentParser, exit_with
from distcls.data.images import BadImage
from distcls.data.sources import decode_image
from distcls.errors import UserError
from distcls.inference import restore


def parse_args(argv: Sequence[str]):
    p = ArgumentParser(prog="python -m distcls.predict", description="Predict the classes of image files with a distcls checkpoint.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. runs/x/checkpoints/best.pt)")
    p.add_argument("--top-k", type=int, default=1, help="print the K most likely classes per image")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (jpg, png, ...)")
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    restored = restore(args.checkpoint, device)
    spec = restored.spec
    names = list(spec.class_names) or [str(i) for i in range(spec.num_classes)]
    images = []
    for path in args.images:
        if not Path(path).is_file():
            raise UserError(f"image {path} does not exist")
        try:
            images.append(decode_image(path, spec.image_size, spec.channels, restored.cfg.data.eval_resize))
        except BadImage as exc:
            raise UserError(f"{exc}; pass image files (jpg, png, ...)") from None
    batch = torch.stack(images).to(device)
    with torch.no_grad():
        x = restored.preprocess(batch, torch.arange(len(batch)), 0, train=False)
        probs = restored.model(x).float().softmax(1).cpu()
    k = min(args.top_k, spec.num_classes)
    top_p, top_i = probs.topk(k, dim=1)
    for path, ps, idx in zip(args.images, top_p.tolist(), top_i.tolist()):
        print(path + "".join(f"\t{names[i]}\t{p:.4f}" for p, i in zip(ps, idx)))
    return 0


def cli() -> None:
    exit_with(main)


if __name__ == "__main__":
    cli()
