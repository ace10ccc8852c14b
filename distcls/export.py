"""`python -m distcls.export --checkpoint P --format onnx|torchscript|exported --out FILE [key.sub=value ...]`

Deploys a trained checkpoint as one self-contained model file:
- the network in eval mode (BatchNorm uses its running statistics, dropout is off) with the
  checkpoint's normalization baked in;
- INPUT: a uint8 tensor [N, C, S, S], pixel values 0..255, channels as the checkpoint's data (RGB,
  or 1 for grayscale), S = the checkpoint's input size (its evaluation size: data.eval_crop_size,
  default data.image_size; not a FixRes run's data.train_crop_size): what a JPEG/PNG decoder gives after
  resizing/cropping. N (the batch) is dynamic;
- OUTPUT: float32 logits [N, num_classes] (softmax them for probabilities), classes in the order
  of the checkpoint's data_spec.class_names.
- METADATA (deployment_metadata): class names, channels, size, resize, interpolation, mean/std,
  the layouts, inside the file: ONNX metadata_props "distcls.<key>", a "distcls.json" extra file in
  TorchScript and torch.export archives (read_metadata; `predict --model FILE` uses it).

Formats: `onnx` (torch.onnx.export's default dynamo exporter, opset of torch's choosing; needs the
`export` extra: pip install 'distcls[export]' for onnx, onnxscript and onnxruntime), `torchscript`
(torch.jit.trace; load with torch.jit.load), `exported` (torch.export, a .pt2 file; load with
torch.export.load(FILE).module()).

At the end the file is loaded back (ONNX through onnxruntime) and run on a batch of real images
of the checkpoint's dataset (its validation split, else test; --check-images of them, resized to
S x S as evaluation does and rounded to uint8): the maximum absolute difference of its logits from
the eager model's (the same path as `evaluate`: Preprocess, then the model) is printed, and a
difference above --tolerance is an error; the file is written next to --out first and moved into
place only after that check passed, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import importlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from distcls.cli import ArgumentParser, exit_with
from distcls.errors import OutputWriteFailed, UserError, first_line
from distcls.runtime.atomic_files import free_space

# Which weights: the checkpoint's `model` state_dict, or with --ema its model EMA's (restore());
# nothing below depends on which one it is.

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportedClassifier(nn.Module):
    """uint8 [N, C, S, S] images -> logits: the checkpoint's normalization (as Preprocess does it: on the
    0..255 scale, subtract mean*255, divide by std*255), then the network."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.mean) / self.std)


def parse_args(argv: Sequence[str]):
    p = ArgumentParser(
        prog="python -m distcls.export",
        description="Export a distcls checkpoint for deployment (ONNX, TorchScript or torch.export).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. runs/x/checkpoints/best.pt)")
    p.add_argument(
        "--ema",
        action="store_true",
        help="use the checkpoint's model EMA weights (trained with train.ema.enabled=true) instead of its trained "
             "weights",
    )
    p.add_argument(
        "--format",
        required=True,
        choices=sorted(EXPORTERS),
        help="onnx (onnxruntime etc.), torchscript (torch.jit.load), exported (torch.export.load)",
    )
    p.add_argument(
        "--out", required=True, help="the file to write, e.g. model.onnx, model.ts, model.pt2 (replaced if it exists)"
    )
    p.add_argument(
        "--check-images", type=int, default=16, metavar="N",
        help="validation images to compare the exported model with the eager one on (0 = no check, no dataset needed)",
    )
    p.add_argument(
        "--tolerance", type=float, default=1e-3, help="largest accepted absolute difference of a logit in that check"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value",
        help="config overrides, e.g. data.root=/data/cifar (where the check images are)",
    )
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the formats
# Each: (write(module, example, path), load(path) -> callable on a uint8 CPU tensor returning logits).


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=65536)


def _write_bytes(path: Path, serialize: Callable[[io.BytesIO], None]) -> None:
    """Serialize in memory, then write with Python: torch's own file writer aborts the process
    (C++ terminate, exit 134) when the disk fills; a Python write raises OSError, reported as such."""
    buffer = io.BytesIO()
    serialize(buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def _write_exported(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: _batch_dim()}}, strict=False)
    _write_bytes(path, lambda buffer: torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(meta)}))


def _load_exported(path: Path) -> Callable:
    return torch.export.load(str(path)).module()


def _write_torchscript(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # torch deprecates TorchScript in favour of torch.export; still the format many runtimes load
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        _write_bytes(path, lambda buffer: torch.jit.save(traced, buffer, _extra_files={META_FILE: json.dumps(meta)}))


def _load_torchscript(path: Path) -> Callable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def _need_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--format onnx needs the packages {', '.join(missing)}: pip install 'distcls[export]' "
                        f"(or pip install {' '.join(missing)}); or choose --format torchscript|exported")


def _write_onnx(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    # protobuf's 2 GiB limit
    big = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > 1.8 * 2**30
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes={"images": {0: _batch_dim()}}, verbose=False, external_data=big)
    program.save(str(path), external_data=big)  # big: the weights go to FILE.data beside it
    import onnx
    model = onnx.load(str(path), load_external_data=False)  # the graph only: external weights stay where they are
    onnx.helper.set_model_props(model, {f"distcls.{k}": json.dumps(v) for k, v in meta.items()})
    onnx.save(model, str(path))


def _load_onnx(path: Path) -> Callable:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


META_FILE = "distcls.json"  # TorchScript / torch.export extra file; ONNX: metadata_props "distcls.<key>" (JSON values)


def deployment_metadata(restored) -> dict:
    """What a deployer needs to feed the exported model and read its output, stored inside the file."""
    from distcls import __version__
    from distcls.data.file_source import evaluation_resize
    spec, data = restored.spec, restored.cfg.data
    return {
        "class_names": list(spec.labels),
        "channels": spec.channels,
        "image_size": spec.image_size,
        "resize": evaluation_resize(data, spec.image_size),
        "interpolation": data.interpolation,
        "input": f"uint8 [N, {spec.channels}, {spec.image_size}, {spec.image_size}], 0..255, "
        f"{'RGB' if spec.channels == 3 else 'grayscale'}: resize the shorter side to 'resize' (antialiased), center "
        "crop 'image_size'",
        "output": f"float32 logits [N, {spec.num_classes}] in the order of class_names (softmax for probabilities)",
        "mean": list(spec.mean),
        "std": list(spec.std),
        "normalization": "inside the model (mean/std on the 0..1 scale, for reference)",
        "distcls": __version__,
    }


def read_metadata(path) -> dict:
    """The deployment metadata of a file distcls.export wrote ({} for a file without it)."""
    from distcls.runtime.atomic_files import model_file_kind
    kind = model_file_kind(path)
    if kind == "onnx":
        import onnx
        props = onnx.load(str(path), load_external_data=False).metadata_props
        return {p.key.removeprefix("distcls."): json.loads(p.value) for p in props if p.key.startswith("distcls.")}
    files = {META_FILE: ""}
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    elif kind == "exported":
        torch.export.load(str(path), extra_files=files)
    else:
        return {}
    return json.loads(files[META_FILE]) if files[META_FILE] else {}


EXPORTERS = {
    "onnx": (_write_onnx, _load_onnx),
    "torchscript": (_write_torchscript, _load_torchscript),
    "exported": (_write_exported, _load_exported),
}
# When a format cannot capture a model (data-dependent control flow, unsupported ops): the one to try instead.
OTHER_FORMAT = {
    "onnx": (
        "try --format torchscript (it traces the path the example input takes; the export's check compares it "
        "with the eager model on real images)"
    ),
    "exported": (
        "try --format torchscript (it traces the path the example input takes; the export's check compares it "
        "with the eager model on real images)"
    ),
    "torchscript": "try --format exported (torch.export), or make the model traceable",
}


# --------------------------------------------------------------------------- main


def check_images(restored, path: str, n: int, overrides: Sequence[str]) -> tuple[torch.Tensor, str]:
    """Up to `n` images of the checkpoint's validation split (else test) as the exported model takes
    them, uint8 [n, C, S, S] on the CPU, and where they come from."""
    from distcls.data import build_data, eval_loader
    from distcls.checkpoint.restore import check_stored_plugins

    check_stored_plugins(restored.checkpoint.config, path, overrides, sections=("data",))
    data = build_data(restored.cfg)
    if (data.spec.channels, data.spec.num_classes) != (restored.spec.channels, restored.spec.num_classes):
        raise UserError(
            f"the data has {data.spec.channels} channels / {data.spec.num_classes} classes, the checkpoint "
            f"{restored.spec.channels} / {restored.spec.num_classes}; point the overrides at its dataset, or "
            "--check-images 0"
        )
    split = "val" if data.splits.val is not None and len(data.splits.val) else "test"
    view = getattr(data.splits, split).truncated(n)
    images = next(iter(eval_loader(view, len(view), 1, 0, torch.device("cpu")))).images
    pre = restored.preprocess
    from distcls.data.transforms.pixels import resize_square
    # as evaluation brings them there
    x = resize_square(pre.match_channels(images.float()), pre.image_size, pre.interpolation)
    return x.round().clamp(0, 255).to(torch.uint8), f"{len(x)} {split} images of {restored.cfg.data.name}"


def _check_out(out: Path, fmt: str, checkpoint: str) -> None:
    """Before any work: --out names a file export may write, and never one it must not replace."""
    from distcls.runtime.atomic_files import EXPORT_KINDS, model_file_kind
    from distcls.run.outputs import path_name_problem
    problem = path_name_problem(out)
    if problem:
        raise UserError(f"--out {out} cannot be used: {problem}; choose a shorter path")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name, e.g. {out / 'model.onnx'}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: directory {out.parent} is not writable")
    if fmt == "exported" and out.suffix != ".pt2":
        raise UserError(
            "--format exported writes a torch.export archive, whose name must end in .pt2 (torch.export.load needs "
            f"it): e.g. --out {out.with_suffix('.pt2')}"
        )
    try:
        st = os.stat(out)  # through a symbolic link: what it points at
    except OSError:
        return  # nothing there (or a dangling link, which the export replaces)
    if not stat.S_ISREG(st.st_mode):
        what = (
            "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a special file"
        )
        raise UserError(
            f"--out {out} is {what}, not a regular file; export writes a new file: give a file name, e.g. "
            f"model.{_SUFFIX[fmt]}"
        )
    try:
        same = os.path.samefile(out, checkpoint)
    except OSError:
        same = False
    if same:
        other = out.with_suffix("." + _SUFFIX[fmt])
        other = other if other != out else out.with_name(f"{out.stem}_model.{_SUFFIX[fmt]}")
        raise UserError(f"--out {out} is the checkpoint being exported ({checkpoint}); exporting would replace it: "
                        f"choose another name, e.g. {other}")
    kind = model_file_kind(out)
    if kind != fmt:
        what = EXPORT_KINDS.get(kind) or (
            "a distcls/torch checkpoint" if kind == "checkpoint" else "not a model file distcls wrote"
        )
        raise UserError(f"--out {out} exists and is {what}; export replaces only an earlier {fmt} export: "
                        "choose another name, or move that file away first")


_SUFFIX = {"onnx": "onnx", "torchscript": "ts", "exported": "pt2"}
_STAGING_TAG = "export-staging"


def _staging_prefix(out: Path) -> str:
    """The hidden staging folder's name for --out: `.NAME.export-staging.HOST.PID.` + mkdtemp's 8 random characters."""
    return f".{out.name[:64]}.{_STAGING_TAG}.{socket.gethostname()}."


def _remove_stale_staging(out: Path) -> None:
    """Staging folders an earlier export of the same --out left (it was killed): named exactly as this
    host's exports name them, of a process that is gone, holding nothing but the export's files."""
    prefix = _staging_prefix(out)
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.[A-Za-z0-9_]{8}")
    for entry in out.parent.glob(f".{glob.escape(out.name[:64])}.{_STAGING_TAG}.*"):
        match = pattern.fullmatch(entry.name)
        if not (match and entry.is_dir() and not entry.is_symlink()):
            continue
        if not {f.name for f in entry.iterdir()} <= {out.name, out.name + ".data"}:
            continue  # something else lives there: not ours to remove
        try:
            os.kill(int(match.group(1)), 0)
            continue  # still running: another export of the same file
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # another user's process: not ours to judge
            continue


def _make_staging(out: Path) -> Path:
    """The staging folder beside --out, made before any work: a directory that refuses new entries
    (although os.access says it is writable, e.g. /proc) is an error before the checkpoint is read."""
    _remove_stale_staging(out)
    try:
        return Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}.", dir=out.parent))
    except OSError as exc:
        raise UserError(
            f"--out {out}: cannot create files in {out.parent} ({exc.strerror or first_line(exc)}); choose another "
            "directory"
        ) from None


def _write_failed(out: Path, exc: OSError, staging: Path) -> OutputWriteFailed:
    for partial in staging.iterdir():  # the disk's free space as the user will find it
        partial.unlink(missing_ok=True)
    free = free_space(out.parent)
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return OutputWriteFailed(
        f"could not write {out}: {exc.strerror or first_line(exc)} (the disk holding {out.parent}: {free}); nothing "
        f"was written{': free some space, or choose another --out' if full else ''}"
    )


class _Interrupted(BaseException):  # not an Exception: no `except Exception` on the way (torch's, ours) may swallow it
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise _Interrupted(signum)


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.check_images < 0:
        raise UserError(f"--check-images must be >= 0, got {args.check_images}")
    if not args.tolerance > 0:
        raise UserError(f"--tolerance must be a positive number, got {args.tolerance}")
    out = Path(args.out)
    if args.format == "onnx":
        _need_onnx()
    _check_out(out, args.format, args.checkpoint)
    staging = _make_staging(out)  # beside --out, before any work: moved into place after the check
    previous, result, moved = {}, None, []
    try:
        for name in STOP_SIGNALS:  # a signal ends the export through `finally`: the staging folder goes with it
            previous[name] = signal.signal(getattr(signal, name), _raise_interrupted)
        result = _export(args, out, staging, moved)
    except _Interrupted as exc:
        from distcls.cli import report

        report(
            "stopped",
            f"export interrupted by {exc} after {out} was written"
            if moved
            else f"export interrupted by {exc}; nothing was written",
        )
        return 128 + exc.signum
    finally:
        for name in previous:  # no signal may interrupt the clean-up itself
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        shutil.rmtree(staging, ignore_errors=True)
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    diff, agree, n, source, spec = result
    print(
        f"wrote {out} ({args.format}): input uint8 [N, {spec.channels}, {spec.image_size}, {spec.image_size}] (0..255, "
        f"batch N dynamic), output float32 logits [N, {spec.num_classes}]"
    )
    if n is None:
        print("check: skipped (--check-images 0)")
    else:
        print(f"check: max abs difference of the logits from the eager model {diff:.3g} on {source} "
              f"(tolerance {args.tolerance:g}); top-1 agrees on {agree}/{n}")
    return 0


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch's tracers log their guard failures (dozens of lines on stderr) before raising: the
    exception says it, in one line below."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # torch's loggers set their own levels: disable them all, for the capture only
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # and the graph it prints on a failed capture
            yield
    except BaseException:
        raise
    else:
        sys.stderr.write(said.getvalue())  # a capture that worked: its warnings are the user's to see
    finally:
        logging.disable(before)


def _reason(exc: BaseException) -> str:
    """The root cause of an exporter's failure (the ONNX exporter wraps torch.export's), one plain line."""
    seen = [exc]
    while seen[-1].__cause__ is not None and len(seen) < 10:
        seen.append(seen[-1].__cause__)
    root = seen[-1]
    return re.sub(r"\x1b\[[0-9;]*m", "", f"{type(root).__name__}: {first_line(root, limit=400)}")


def _export(args, out: Path, staging: Path, moved: list) -> tuple:
    """Restore, write into `staging`, load back and check, then move into place. (diff, agree, images checked, source,
    spec)."""
    from distcls.checkpoint.restore import restore

    restored = restore(args.checkpoint, torch.device("cpu"), args.overrides, ema=args.ema)
    spec = restored.spec
    images, source = (
        check_images(restored, args.checkpoint, args.check_images, args.overrides) if args.check_images else (None, "")
    )
    module = ExportedClassifier(restored.model, spec.mean, spec.std).eval()
    # 2: a batch dim that is not 1
    example = torch.zeros(2, spec.channels, spec.image_size, spec.image_size, dtype=torch.uint8)
    write, load = EXPORTERS[args.format]
    staged = staging / out.name
    try:
        with _quiet_torch_logs():
            write(module, example, staged, deployment_metadata(restored))
    except OSError as exc:
        raise _write_failed(out, exc, staging) from None
    except (UserError, _Interrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # the exporter could not capture the model: torch's reason, in one line
        raise UserError(f"--format {args.format} cannot capture model {restored.cfg.model.name}: {_reason(exc)}; "
                        f"{OTHER_FORMAT[args.format]}; nothing was written") from None
    exported = load(staged)
    diff = agree = None
    with torch.no_grad():
        probe = torch.randint(
            0, 256, (3, *example.shape[1:]), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
        got = exported(probe)  # another batch size than the example's: the batch dimension is dynamic
        if tuple(got.shape) != (3, spec.num_classes):
            raise RuntimeError(
                f"the exported model returned shape {tuple(got.shape)} for a batch of 3, expected (3, "
                f"{spec.num_classes})"
            )
        if images is not None:
            eager = restored.model(restored.preprocess(images, torch.arange(len(images)), 0, train=False))
            diff = (exported(images).float() - eager.float()).abs().max().item()
            agree = int((exported(images).argmax(1) == eager.argmax(1)).sum())
    if images is not None and not diff <= args.tolerance:
        raise UserError(
            f"the exported model differs from the eager one by up to {diff:.3g} on {source} (--tolerance "
            f"{args.tolerance:g}); nothing was written"
        )
    try:
        for f in sorted(staging.iterdir()):  # FILE (and FILE.data for a big ONNX model)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(f, out.parent / f.name)
            moved.append(f.name)
    except OSError as exc:
        raise _write_failed(out, exc, staging) from None
    return diff, agree, None if images is None else len(images), source, spec


def cli() -> None:
    exit_with(main)


if __name__ == "__main__":
    cli()
