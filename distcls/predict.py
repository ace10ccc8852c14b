"""`python -m distcls.predict --checkpoint P [--top-k K] [--json] IMAGE_OR_DIR...`: classify image files.

A directory means every image file in it (extensions as for imagefolder data), recursively, in
sorted order; other files in a directory are ignored, and so are directories named like images and
names starting with "." (hidden files, macOS `._` files): the rule of image-folder data too. Each image is decoded like
the checkpoint's evaluation data: for image folders the shorter side resized to data.eval_resize (default input size /
0.875), for the in-memory datasets (whose images already have the model's input size) to the input size; then a center
crop of the input size, the checkpoint's channels and normalization. One line per image on stdout:
`path<TAB>label<TAB>probability` (and the next K-1 guesses with --top-k), or with --json one JSON object per line:
`{"path": ..., "label": ..., "prob": ..., "top_k": [{"label": ..., "prob": ...}, ...]}`. A missing, unreadable or
non-image file gets ONE `distcls: error: ...` line on stderr naming it; the other files are still predicted, and the
exit code is 2 if any file failed, else 0.
"""
from __future__ import annotations

import argparse
from distcls.tracking import json_out
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch

from distcls.cli import ArgumentParser, exit_with, positive_int
from distcls.data.file_source import evaluation_resize, load_eval_image
from distcls.data.datasets.imagefolder import EXTENSIONS, image_files
from distcls.errors import ExitCode
from distcls.checkpoint.restore import restore


def parse_args(argv: Sequence[str]):
    p = ArgumentParser(
        prog="python -m distcls.predict",
        description="Predict the classes of image files with a distcls checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint file (e.g. runs/x/checkpoints/best.pt)")
    source.add_argument(
        "--model",
        help="a file distcls.export wrote (.onnx with onnxruntime, TorchScript, .pt2): its stored class names and "
        "input size are used, the same answers as --checkpoint",
    )
    p.add_argument(
        "--ema",
        action="store_true",
        help="use the checkpoint's model EMA weights (trained with train.ema.enabled=true) instead of its trained "
             "weights",
    )
    p.add_argument("--top-k", type=positive_int, default=1, help="report the K most likely classes per image")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per image and line instead of tab-separated text"
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="key.sub=value",
        help="config override, repeatable; e.g. --override model.name=mypkg.nets:build to allow a checkpoint's plug-in "
             "model",
    )
    p.add_argument(
        "images", nargs="+", metavar="IMAGE_OR_DIR",
        help="image files (jpg, png, ...) and/or directories of them (searched recursively)",
    )
    return p.parse_args(argv)


def _error(message: str) -> None:
    print(f"distcls: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def expand(inputs: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """(path, None) per image to predict, in order; (path, error) for an input that cannot be used."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = image_files(p)
            if not files:
                yield item, f"directory {item} holds no image files ({', '.join(sorted(EXTENSIONS))})"
            for f in files:
                yield str(f), None
        elif p.is_file():
            yield item, None
        else:
            yield item, f"image {item} does not exist"


class _Predictor:
    """What predict runs: uint8 images -> logits, with the class names and how to prepare an image."""

    def __init__(self, logits, names, image_size: int, channels: int, resize: int, interpolation: str):
        self.logits, self.names = logits, names
        self.image_size, self.channels, self.resize, self.interpolation = image_size, channels, resize, interpolation


def _from_checkpoint(args, device) -> _Predictor:
    restored = restore(args.checkpoint, device, args.override, ema=args.ema)
    spec = restored.spec

    def logits(batch):
        x = restored.preprocess(batch.to(device), torch.arange(len(batch), device=device), 0, train=False)
        return restored.model(x)

    return _Predictor(
        logits,
        spec.labels,
        spec.image_size,
        spec.channels,
        evaluation_resize(restored.cfg.data, spec.image_size),
        restored.cfg.data.interpolation,
    )


def _from_export(args) -> _Predictor:
    from distcls.errors import UserError
    from distcls.export import EXPORTERS, read_metadata
    from distcls.runtime.atomic_files import model_file_kind
    if args.ema or args.override:
        raise UserError(
            "--ema and --override apply to --checkpoint; an exported file holds one set of weights and its own settings"
        )
    path = Path(args.model)
    if not path.is_file():
        raise UserError(f"--model {path} does not exist; give a file written by python -m distcls.export")
    kind = model_file_kind(path)
    if kind not in EXPORTERS:
        raise UserError(f"--model {path} is not a file distcls.export writes (ONNX, TorchScript, torch.export .pt2)")
    if kind == "onnx":
        from distcls.export import _need_onnx
        _need_onnx()
    meta = read_metadata(path)
    if not meta:
        raise UserError(
            f"--model {path} holds no distcls metadata (exported by another tool, or by distcls before it stored it); "
            "export it again from its checkpoint"
        )
    run = EXPORTERS[kind][1](path)
    return _Predictor(
        lambda batch: run(batch.cpu().contiguous()),
        meta["class_names"],
        meta["image_size"],
        meta["channels"],
        meta["resize"],
        meta["interpolation"],
    )


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictor = _from_checkpoint(args, device) if args.checkpoint else _from_export(args)
    names = predictor.names
    k = min(args.top_k, len(names))
    failed = 0
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([img for _, img in pending])
        with torch.no_grad():
            probs = predictor.logits(batch).float().softmax(1).cpu()
        top_p, top_i = probs.topk(k, dim=1)
        for (path, _), ps, idx in zip(pending, top_p.tolist(), top_i.tolist()):
            if args.json:
                guesses = [{"label": names[i], "prob": p} for p, i in zip(ps, idx)]
                print(
                    json_out.dumps(
                        {"path": path, "label": guesses[0]["label"], "prob": guesses[0]["prob"], "top_k": guesses}
                    )
                )
            else:
                print(path + "".join(f"\t{names[i]}\t{p:.4f}" for p, i in zip(ps, idx)))
        sys.stdout.flush()
        pending.clear()

    for path, problem in expand(args.images):
        if problem is None:
            try:
                pending.append(
                    (
                        path,
                        load_eval_image(
                            path, predictor.image_size, predictor.channels, predictor.resize, predictor.interpolation
                        ),
                    )
                )
            except Exception as exc:  # BadImage, and whatever else a damaged file makes the decoder raise
                problem = f"cannot read image {path} ({type(exc).__name__}: {str(exc)[:200]})"
        if problem is not None:
            failed += 1
            _error(problem)
        if len(pending) >= args.batch_size:
            flush()
    flush()
    return ExitCode.USAGE if failed else ExitCode.OK


def cli() -> None:
    exit_with(main)


if __name__ == "__main__":
    cli()
