"""An image folder's file list, built once by the ranks together, stored, and reused.

Building it (the first start): rank 0 walks the tree (one `scandir` per folder, no `stat` per file),
every rank checks its share of the files (rank r checks files r, r + W, r + 2W, ...: each file is
opened once in all, by one rank) and the results are gathered, so the check's cost is divided by
the world size, never multiplied. Rank 0 writes the index atomically (`save`).

Reusing it (a `--resume`, a torchrun restart, a SLURM requeue, another run on the same data): the
ranks read the index and rank 0 compares the modification time of every folder it lists with the
folder's now (`changes`): one `stat` per folder, none per file. A file added, removed or renamed
changes its folder's time, so a changed dataset is indexed again (and says what changed); a file
rewritten in place under the same name does not (build the index again with
`python -m distcls.data.index ROOT`).

What it holds (numpy arrays and one JSON header, read with allow_pickle=False): the class folders,
each split folder's files (paths relative to the root, labels), their sizes, the check's verdict
on each bad file, and the folders with their times.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from distcls.data.sample_table import SampleTable
from distcls.errors import UserError, first_line
from distcls.runtime import dist
from distcls.runtime.atomic_files import atomic_write_bytes

FORMAT = 1
SPLITS = ("train", "val", "test")
SHARED_NAME = ".distcls_index.npz"  # ROOT/.distcls_index.npz: built ahead by `python -m distcls.data.index ROOT`
RUN_NAME = "data_index.npz"  # the run's own, in run.out_dir, when no shared one exists
EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


@dataclass
class FolderIndex:
    root: str
    train_dir: str  # "train", or "" when the class folders sit directly under the root
    classes: list  # the training class folders' names, sorted (labels are their positions)
    split_classes: dict  # split -> the class folders its folder holds (a val/ class that train/ lacks is an error)
    tables: dict  # split -> SampleTable of its files (paths relative to the root), for each split folder present
    sizes: dict  # split -> int64 bytes per file
    bad: dict  # split -> {index in its table: why the file is unusable}
    folders: list  # [(folder relative to the root, mtime_ns)]: what a restart compares
    checked_by: list = field(default_factory=list)  # files each rank checked when it was built
    seconds: float = 0.0  # how long building it took
    read_from: Optional[Path] = None  # the file it was read from (None: built by this start)

    def source_pairs(self, split: str) -> Optional[SampleTable]:
        table = self.tables.get(split)
        return None if table is None else SampleTable(table.paths, table.offsets, table.labels, self.root)


# --------------------------------------------------------------------------- the walk


def image_files(folder: Path, visited: Optional[list] = None) -> list[Path]:
    """The image files under `folder`, recursively, in sorted order: FILES with an image extension.

    The one rule of image-folder data and of predict's directory walk: a directory named like an
    image (`x.jpg/`) is not an image (the files in it are), every name starting with "." is
    skipped, hidden files and folders alike, macOS's `._x.jpg` (AppleDouble metadata) among them,
    and symbolic links to folders are followed (torchvision's ImageFolder does), each real folder
    read once (a link to an ancestor cannot loop). One `scandir` per folder: the entry types come
    with the listing, so no file is `stat`ed (only symbolic links are resolved). `visited`
    collects (folder, mtime_ns) of every folder read, the time taken before it was listed.
    """
    return [Path(p) for p in _image_paths(str(folder), visited)]


def _image_paths(folder: str, visited: Optional[list] = None) -> list[str]:
    """image_files as sorted strings (no Path object per file: an index of a million files makes them)."""
    found, seen = [], set()
    pending = [folder]
    while pending:
        top = pending.pop()
        real = os.path.realpath(top)
        if real in seen:
            continue
        seen.add(real)
        if visited is not None:
            # before the listing: a file added meanwhile changes the time recorded after it
            visited.append((top, _mtime(top)))
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if name[0] == ".":
                continue
            try:
                if entry.is_dir():  # follows a symbolic link to a folder
                    pending.append(entry.path)
                elif os.path.splitext(name)[1].lower() in EXTENSIONS and entry.is_file():
                    found.append(entry.path)
            except OSError:
                continue
    found.sort(key=_path_order)
    return found


def _path_order(path: str) -> tuple:
    """Sorted as Path objects sort (by components), without making one per file."""
    return tuple(path.split(os.sep))


def class_folders(folder: Path) -> list[str]:
    """The visible folders in `folder` (none when it cannot be listed), sorted."""
    try:
        return sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []


def walk(root: Path) -> FolderIndex:
    """The tree's layout and files, unchecked (rank 0). Every folder it reads is recorded with its
    modification time, taken before it is listed; the root by the names of its folders instead (an
    index saved there, a hidden file, changes the root's time)."""
    start = time.perf_counter()
    root_folders = class_folders(root)
    train_dir = "train" if (root / "train").is_dir() else ""
    visited = []
    tables, split_classes, classes = {}, {}, []
    for split in SPLITS:
        folder = root / train_dir if split == "train" else root / split
        if split != "train" and (not train_dir or not folder.is_dir()):
            continue
        if folder != root:
            visited.append((str(folder), _mtime(folder)))  # a class folder added or removed changes it
        split_classes[split] = class_folders(folder)
        if split == "train":
            classes = [c for c in split_classes[split] if train_dir or c not in ("val", "test")]
        pairs = []
        for label, name in enumerate(classes):
            class_dir = folder / name
            if class_dir.is_dir():
                # the walk's paths start with its folder's string
                prefix, relative = str(class_dir), os.path.relpath(class_dir, root)
                pairs += [(relative + p[len(prefix):], label) for p in _image_paths(prefix, visited)]
        tables[split] = SampleTable.from_pairs(pairs)
    folders = [("", root_folders)] + [(os.path.relpath(f, root), mtime) for f, mtime in dict(visited).items()]
    return FolderIndex(
        str(root), train_dir, classes, split_classes, tables, {}, {}, folders, seconds=time.perf_counter() - start
    )


def _mtime(folder) -> int:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return -1


# --------------------------------------------------------------------------- the check, divided among the ranks


CHECK_CHUNK = 4096  # files handed to the thread pool at a time: a million futures at once would cost ~0.5 GB


def _check_share(index: FolderIndex, rank: int, world: int) -> dict:
    """This rank's share of the per-file check: {split: (indices, sizes, {index: reason})}."""
    from distcls.data.transforms.images import inspect_image_file  # torchvision.io: imported only for image folders
    out = {}
    offset = 0
    with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound: one open and two 16-byte reads per file
        for split in SPLITS:
            table = index.tables.get(split)
            if table is None:
                continue
            # global position offset + i, strided
            mine = np.arange((rank - offset) % world, len(table), world, dtype=np.int64)
            offset += len(table)
            sizes, reasons = np.zeros(len(mine), dtype=np.int64), {}
            for start in range(0, len(mine), CHECK_CHUNK):
                chunk = mine[start:start + CHECK_CHUNK]
                results = pool.map(inspect_image_file, [os.path.join(index.root, table.path(int(i))) for i in chunk])
                for j, (i, (size, why)) in enumerate(zip(chunk, results)):
                    sizes[start + j] = size
                    if why:
                        reasons[int(i)] = why
            out[split] = (mine, sizes, reasons)
    return out


def check(index: FolderIndex) -> FolderIndex:
    """Collective: every rank checks its share; every rank gets every result."""
    start = time.perf_counter()
    rank, world = dist.rank_and_world()
    shares = dist.all_gather_object(_check_share(index, rank, world))
    for split, table in index.tables.items():
        sizes = np.zeros(len(table), dtype=np.int64)
        bad = {}
        for share in shares:
            indices, share_sizes, reasons = share[split]
            sizes[indices] = share_sizes
            bad.update(reasons)
        index.sizes[split], index.bad[split] = sizes, dict(sorted(bad.items()))
    index.checked_by = [sum(len(share[s][0]) for s in share) for share in shares]
    index.seconds += time.perf_counter() - start
    return index


# --------------------------------------------------------------------------- the file


def save(index: FolderIndex, path: Path) -> None:
    header = {
        "format": FORMAT,
        "root": os.path.realpath(index.root),
        "train_dir": index.train_dir,
        "classes": index.classes,
        "split_classes": index.split_classes,
        "folders": index.folders,
        "checked_by": index.checked_by,
        "seconds": index.seconds,
        "bad": {s: {str(i): why for i, why in b.items()} for s, b in index.bad.items()},
        "splits": list(index.tables),
    }
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    for split, table in index.tables.items():
        arrays.update(
            {
                f"{split}_paths": table.paths,
                f"{split}_offsets": table.offsets,
                f"{split}_labels": table.labels,
                f"{split}_sizes": index.sizes[split],
            }
        )
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


class StaleIndex(Exception):
    """The index cannot be used (unreadable, another format, another dataset): build it again."""


def load(path: Path, root: Path, data: Optional[bytes] = None) -> FolderIndex:
    """The index in `path` (or in `data`, its bytes); StaleIndex when it cannot be used, whatever is wrong with the
    file."""
    try:
        data = Path(path).read_bytes() if data is None else data
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            header = json.loads(f["header"].tobytes().decode())
            if header.get("format") != FORMAT:
                raise StaleIndex(f"it has format {header.get('format')}, this distcls reads {FORMAT}")
            tables = {s: SampleTable(f[f"{s}_paths"], f[f"{s}_offsets"], f[f"{s}_labels"]) for s in header["splits"]}
            sizes = {s: f[f"{s}_sizes"] for s in header["splits"]}
        bad = {s: {int(i): why for i, why in b.items()} for s, b in header["bad"].items()}
        return FolderIndex(
            str(root),
            header["train_dir"],
            header["classes"],
            header["split_classes"],
            tables,
            sizes,
            bad,
            [tuple(f) for f in header["folders"]],
            header.get("checked_by", []),
            header.get("seconds", 0.0),
        )
    except StaleIndex:
        raise
    # a truncated or foreign file fails in zipfile, numpy or json in many ways: all mean "build it again"
    except Exception as exc:
        raise StaleIndex(f"it cannot be read ({type(exc).__name__}: {first_line(exc)})") from None


def recheck_bad(index: FolderIndex) -> list:
    """The files the index calls bad, inspected again (a few): one replaced in place under the same name
    changes no folder's time. Rank 0's work: the index is corrected, and the repairs, [(split, index, size)],
    are returned for the other ranks (`apply_repairs`)."""
    from distcls.data.transforms.images import inspect_image_file
    repaired = []
    for split, bad in index.bad.items():
        table = index.tables[split]
        for i in list(bad):
            size, why = inspect_image_file(os.path.join(index.root, table.path(i)))
            if why is None:
                repaired.append((split, i, size))
            else:
                bad[i] = why
    apply_repairs(index, repaired)
    return repaired


def apply_repairs(index: FolderIndex, repaired: list) -> None:
    for split, i, size in repaired:
        index.bad[split].pop(i, None)
        index.sizes[split][i] = size


def changes(index: FolderIndex, root: Path, limit: int = 3) -> list[str]:
    """What differs between the indexed folders and the tree now (one stat per folder); [] = unchanged."""
    found = []
    for folder, then in index.folders:
        if not folder:  # the root: its folders by name
            now = class_folders(root)
            if now != then:
                added, gone = sorted(set(now) - set(then)), sorted(set(then) - set(now))
                found.append(", ".join([f"{name}/ added" for name in added] + [f"{name}/ removed" for name in gone]))
            continue
        now = _mtime(root / folder)
        if now != then:
            found.append(f"{folder}/ {'removed' if now == -1 else 'modified'}")
        if len(found) > limit:
            break
    return found


# --------------------------------------------------------------------------- where, and the one entry point


def location(root: Path, configured: Optional[str], run_dir: Optional[Path]) -> Optional[Path]:
    """Where the index lives: data.index when set; else ROOT/.distcls_index.npz when one was built
    there; else the run's out_dir/data_index.npz; None (build it in memory only) without a run."""
    if configured:
        return Path(configured)
    shared = root / SHARED_NAME
    if shared.is_file():
        return shared
    return run_dir / RUN_NAME if run_dir is not None else None


def load_or_build(
    root: Path,
    path: Optional[Path],
    note: Callable[[str], None] = lambda msg: None,
    rebuild: bool = False,
    save_to: Optional[Path] = None,
) -> FolderIndex:
    """Collective: the index at `path` when it is current (rank 0 decides and says which file, with its
    digest: every rank reads that file and checks it holds the same), else built by the ranks together
    and saved by rank 0 at `save_to` (None: kept in memory: a command without a run directory writes
    nothing). `note` hears what happened (rank 0's words)."""
    decision, index, digest, repaired = None, None, None, []
    if dist.is_main_rank():
        decision = "build"
        if path is not None and path.is_file() and not rebuild:
            try:
                data = path.read_bytes()
                index = load(path, root, data)
                changed = changes(index, root)
                if changed:
                    decision = (
                        f"the image folder changed since {path} was built ({', '.join(changed)}): indexing it again"
                    )
                else:
                    decision, digest = "read", hashlib.sha256(data).hexdigest()
                    repaired = recheck_bad(index)
            except StaleIndex as exc:
                decision = f"the index {path} is not usable ({exc}): indexing the image folder again"
    decision, where_read, digest, repaired = dist.broadcast_object(
        (decision, str(path) if path else None, digest, repaired)
    )
    if decision == "read":
        if index is None:
            try:
                data = Path(where_read).read_bytes()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise StaleIndex(
                        "it differs from the one rank 0 read (rewritten meanwhile, or not the same file on every node)"
                    )
                index = load(Path(where_read), root, data)
            except StaleIndex as exc:
                raise UserError(
                    f"the image folder's index {where_read} could not be read on this rank ({exc}); put run.out_dir "
                    "and data.index on a filesystem every node sees, and let one run at a time rebuild a shared index"
                ) from None
            apply_repairs(index, repaired)  # what rank 0 found repaired (no file inspected again here)
        index.read_from = Path(where_read)
        note(
            f"image folder {root}: read its index {where_read} ({sum(len(t) for t in index.tables.values()):,} files; "
            "no walk, no per-file check)"
        )
        if repaired:
            first = index.tables[repaired[0][0]].path(repaired[0][1])
            note(
                f"image folder {root}: {len(repaired)} file(s) the index called bad read well now (replaced in place): "
                f"{first}"
                + (f" and {len(repaired) - 1} more" if len(repaired) > 1 else "")
            )
            if save_to is not None and dist.is_main_rank():
                _save_quietly(index, save_to)
        return index
    if decision != "build":
        note(decision)
    index = dist.broadcast_object(walk(root) if dist.is_main_rank() else None)
    index.root = str(root)
    index = check(index)
    files = sum(len(t) for t in index.tables.values())
    where = "kept in memory only (no run directory)"
    if save_to is not None and dist.is_main_rank():
        where = _save_quietly(index, save_to)
    shares = (
        f"each of {len(index.checked_by)} ranks checked {min(index.checked_by):,}-{max(index.checked_by):,} files"
        if len(index.checked_by) > 1
        else "checked"
    )
    note(f"image folder {root}: indexed {files:,} files in {index.seconds:.1f} s ({shares}); {where}")
    return index


def _save_quietly(index: FolderIndex, path: Path) -> str:
    try:
        save(index, path)
        return f"saved to {path}"
    except OSError as exc:
        return f"not saved to {path} ({exc.strerror or exc}): the next start indexes again"
