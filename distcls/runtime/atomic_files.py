"""Atomic file writes and the one safe way distcls reads torch files.

Every write goes to a temp file in the same directory, is fsync'ed, renamed over the target and
the directory is fsync'ed: a crash at any moment leaves either the old file or the new one.
Every torch file is read with `weights_only=True`; a file that needs arbitrary unpickling is
refused and its code never runs.

Tests only: `inject_fault(fn)` makes every atomic write in this process call `fn(stage, path, tmp)`
at its named stages, so a test can crash or fail a write at an exact point (see its docstring).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from distcls.errors import UserError, first_line


class UnreadableCheckpoint(UserError):
    """The file exists but is truncated, corrupt, or not a weights-only torch file."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FaultHook = Callable[[str, Path, Path], None]
_fault_hook: Optional[FaultHook] = None  # tests only, set by inject_fault; None in every real run


@contextlib.contextmanager
def inject_fault(fn: FaultHook) -> Iterator[FaultHook]:
    """Tests only: while the context is open, every `atomic_write_bytes`/`atomic_write_text` in
    this process calls `fn(stage, path, tmp)` (`path` the target, `tmp` its temp file) at:

    - "written": the temp file holds all the bytes and is fsync'ed; the target is untouched.
      An exception raised here takes the writer's own failure path (temp removed, target kept);
      `os._exit` here is a machine dying before the rename (truncate `tmp` first for a torn write).
    - "replaced": the temp file has been renamed over the target and the directory fsync'ed.

    The hook sees every atomic write (config.yaml, metrics.jsonl, summary.json, checkpoints...):
    pick the one you mean by `path.name`. The previous hook (normally none) is restored on exit.
    Unused, the cost is one `is None` test per write.
    """
    global _fault_hook
    previous, _fault_hook = _fault_hook, fn
    try:
        yield fn
    finally:
        _fault_hook = previous


def current_umask() -> int:
    """The process's umask, read without changing it (Linux's /proc/self/status has it since 4.7);
    elsewhere set and restored at once under a lock (os.umask is the only portable reader)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_umask_lock = threading.Lock()


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically, with the mode a plain open() would give (0666 less the
    umask: 0644 under umask 022), not mkstemp's 0600, so a team can read each other's runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if _fault_hook is not None:
            _fault_hook("written", path, Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    if _fault_hook is not None:
        _fault_hook("replaced", path, Path(tmp))


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_link(source, path) -> None:
    """Make `path` another name of the finished file `source` (hard link, then atomic rename).

    Later atomic writes to `source` replace its directory entry, never this inode, so `path`
    keeps its content. Where hard links are not supported, the bytes are copied instead.
    """
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        atomic_write_bytes(path, source.read_bytes())
        return
    os.replace(tmp, path)
    _fsync_dir(path.parent)


_TEMP_NAMES = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+(\.link)?\.tmp$")


def remove_stale_temps(directory) -> list[Path]:
    """Delete temp files of this module's own naming left by a killed writer (`.NAME.<random>.tmp`).

    Only call this while holding the run's out_dir lock: then no other writer is alive there.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if _TEMP_NAMES.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _check_zip_integrity(p: Path, what: str) -> None:
    """Read every member of a torch zip archive so its CRC-32 is checked (torch.load does not)."""
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise UnreadableCheckpoint(f"{what} {p} is truncated or corrupt ({first_line(exc)})") from None
    if bad is not None:
        raise UnreadableCheckpoint(
            f"{what} {p} is corrupt: its entry {bad} fails the archive's CRC-32 check (flipped bits or a torn copy)"
        )


def free_space(directory) -> str:
    """The free space of the disk holding `directory`, for a write-failed message ("1,234.5 MiB free")."""
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:,.1f} MiB free"
    except OSError:
        return "free space unknown"


# What distcls.export writes, as a reader names it (model_file_kind's answers).
EXPORT_KINDS = {"torchscript": "a TorchScript model (distcls.export --format torchscript; load it with torch.jit.load)",
                "exported": "a torch.export archive (distcls.export --format exported; load it with torch.export.load)",
                "onnx": "an ONNX model (distcls.export --format onnx; run it with onnxruntime)"}


def model_file_kind(path) -> Optional[str]:
    """What a model file is, from its contents: 'checkpoint' (a torch.save archive), 'torchscript',
    'exported' (torch.export), 'onnx', or None (none of these; empty, unreadable)."""
    p = Path(path)
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as archive:
                names = archive.namelist()
            # members sit under one top folder
            ends = lambda suffix: any(n.endswith(suffix) for n in names)  # noqa: E731
            if ends("/archive_format"):
                return "exported"
            if ends("/code/__torch__.py") or ends("/constants.pkl"):
                return "torchscript"
            return "checkpoint" if ends("data.pkl") else None
        with open(p, "rb") as f:
            head = f.read(64)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    # ONNX: a ModelProto: first ir_version (tag 0x08), then the exporter's name (producer_name, tag 0x12)
    if head[:1] == b"\x08" and b"\x12" in head[2:4]:
        return "onnx"
    return None


def load_weights_only(path, what: str = "checkpoint"):
    """torch.load(path, weights_only=True) on CPU, with errors a user can act on.

    A zip archive (every torch.save since 1.6) has its CRCs verified first. ANY failure to read
    or unpickle is an `UnreadableCheckpoint`: a refusal (the file needs arbitrary unpickling) or
    a damaged file (truncated, flipped bits, not a torch file at all).
    """
    p = Path(path)
    if p.is_dir():
        hint = p / "last.pt" if p.name == "checkpoints" or (p / "last.pt").is_file() else p / "checkpoints" / "last.pt"
        raise UserError(f"{what} {path} is a directory; give the path of a .pt file (e.g. {hint})")
    if not p.is_file():
        raise UserError(f"{what} {path} does not exist; check the path")
    try:
        is_zip = zipfile.is_zipfile(p)
    except OSError as exc:
        raise UnreadableCheckpoint(f"{what} {path} cannot be read ({first_line(exc)})") from None
    kind = model_file_kind(p)
    if kind in EXPORT_KINDS:
        raise UnreadableCheckpoint(
            f"{what} {path} is {EXPORT_KINDS[kind]}, not a training checkpoint: give the checkpoint "
            "it was exported from (e.g. runs/NAME/checkpoints/best.pt)"
        )
    if is_zip:
        _check_zip_integrity(p, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol N": the refusal below says it all
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise UnreadableCheckpoint(
                f"refusing to load {what} {path}: it holds objects that need arbitrary unpickling (code could run); "
                "distcls only reads weights-only files: tensors and plain Python data"
            ) from None
        raise UnreadableCheckpoint(f"{what} {path} is truncated or corrupt (not a readable torch file)") from None
    except MemoryError:
        raise UnreadableCheckpoint(f"{what} {path} is corrupt (its sizes are implausible)") from None
    except Exception as exc:  # the unpickler raises IndexError/KeyError/struct.error/... on garbage: all mean corrupt
        raise UnreadableCheckpoint(
            f"{what} {path} is truncated or corrupt ({type(exc).__name__}: {first_line(exc)})"
        ) from None
