"""Data start-up at scale: an ImageNet-shaped image folder, first start vs restart vs torchvision's scan.

Builds (or reuses, --tree DIR) ROOT/train/<1,000 classes>/*.jpg with --files small JPEGs and one
per class in ROOT/val/, then measures, each in fresh processes:
  torchvision_scan_s      torchvision.datasets.ImageFolder(ROOT/train): its constructor (the walk)
  distcls_walk_s          distcls's walk of the same tree (train/ and val/), without the per-file check
  first_start_s           `python -m distcls.train` on the folder (--nproc ranks) from the command to
                          its first training step (first metrics.jsonl record): walk + divided check + index
  restart_s               the same run resumed (--resume auto), command to its first new step: reads the index
  digits_s                the default digits run, command to first step (the floor every start pays)
  filesystem calls        with strace on PATH: openat, stat-family, getdents64 and read calls of each
                          of those commands (all its processes; per rank = / --nproc), and of the scan
  worker_private_mb       a DataLoader worker's private memory growth over one epoch that reads every
                          (path, label) of --worker-samples samples: a list of tuples vs distcls's SampleTable
  shards_*                the same tree written as WebDataset shards (`python -m distcls.shard`, timed:
                          shard_convert_s), then the first start and the restart of the same run on them
  images_per_s            the training loader alone (decode, crop, batches; no model) over --loader-steps
                          steps of batch 64 with --workers DataLoader workers: the image folder vs its shards
"""
from __future__ import annotations

import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distcls.bench.common import child_env, last_line, machine, train_cmd
from distcls.errors import UserError

RUN = [
    "data.name=imagefolder", "data.image_size=16", "model.name=cnn3", "data.batch_size=8", "train.epochs=1",
    "train.max_steps_per_epoch=2", "log.every_steps=1", "log.plots=false", "data.num_workers=0",
    "data.max_eval_samples=16", "dist.device=cpu",
]
SHARD_RUN = [a for a in RUN if not a.startswith("data.name=")] + ["data.name=webdataset", "data.shard_streams=8"]
SYSCALLS = {"openat": ("openat", "open"), "stat": ("newfstatat", "stat", "lstat", "statx", "fstatat64"),
            "getdents64": ("getdents64",), "read": ("read", "pread64")}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--files", type=int, default=20_000, help="training files (spread over 1,000 classes; default 20,000)"
    )
    parser.add_argument("--classes", type=int, default=1000, help="class folders (default 1,000, ImageNet's)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks of the distcls runs (torchrun; default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the timed commands (median kept; default 1)")
    parser.add_argument("--tree", help="build the folder here and keep it (default: a temporary folder, removed)")
    parser.add_argument(
        "--worker-samples", type=int, default=1_000_000,
        help="samples of the worker-memory measurement (default 1M; 0: skip it)",
    )
    parser.add_argument("--no-strace", action="store_true", help="skip the filesystem-call counts")
    parser.add_argument(
        "--loader-steps", type=int, default=100,
        help="steps of batch 64 of the loader images/s (default 100; 0: skip it)",
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the loader images/s (default 2)")
    parser.add_argument(
        "--image-width",
        type=int,
        default=20,
        help="width of the tree's JPEGs, height 4/5 of it (default 20: a tree of "
        "1.28M files fits a small disk; ImageNet's are about 400 px wide)",
    )
    parser.add_argument(
        "--shard-size", type=int, default=None, help="samples per shard (default: files / 256, at most 1,000)"
    )


def _jpeg(seed: int, width: int = 20) -> bytes:
    import numpy as np
    from PIL import Image
    buffer = io.BytesIO()
    # noise: a JPEG of realistic size
    pixels = np.random.default_rng(seed).integers(0, 256, (width * 4 // 5, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def build_tree(root: Path, files: int, classes: int, width: int = 20) -> None:
    """ROOT/train/cNNNN/iNNNNNNN.jpg (files over classes) and ROOT/val/cNNNN/v.jpg; kept when it already holds that
    many."""
    marker = root / ".distcls_bench_tree.json"
    shape = {"files": files, "classes": classes, "width": width}
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return
    if root.exists():
        shutil.rmtree(root)
    images = [_jpeg(c, width) for c in range(classes)]
    for c in range(classes):
        for split in ("train", "val"):
            (root / split / f"c{c:04d}").mkdir(parents=True)
        (root / "val" / f"c{c:04d}" / "v.jpg").write_bytes(images[c])
    for i in range(files):
        c = i % classes
        (root / "train" / f"c{c:04d}" / f"i{i:08d}.jpg").write_bytes(images[c])
    marker.write_text(json.dumps(shape))


def _timed_to_first_step(cmd: list, metrics: Path, env: dict) -> float:
    before = metrics.read_text().count("\n") if metrics.exists() else 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while first is None and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") > before:
            first = time.perf_counter() - t0
        else:
            time.sleep(0.005)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise UserError(f"`{' '.join(cmd[2:])}` exited {proc.returncode}: {last_line(err)}")
    return first if first is not None else time.perf_counter() - t0


def _strace_counts(cmd: list, env: dict, cwd=None) -> dict:
    """{openat, stat, getdents64, read: calls} of `cmd` and all its processes (strace -f -c)."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        proc = subprocess.run(["strace", "-f", "-c", "-o", log.name, *cmd], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise UserError(f"strace {' '.join(cmd[2:])} exited {proc.returncode}: {last_line(proc.stderr)}")
        calls = {}
        for line in Path(log.name).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[-1].isidentifier() and parts[3].isdigit():
                calls[parts[-1]] = calls.get(parts[-1], 0) + int(parts[3])
    return {name: sum(calls.get(s, 0) for s in names) for name, names in SYSCALLS.items()}


_WORKER = r"""
import os, sys, time
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from distcls.data.sample_table import SampleTable

def private_mb(pid):
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/smaps_rollup").read().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024

class Samples(Dataset):
    def __init__(self, samples):
        self.samples = samples
    def __len__(self):
        return len(self.samples)
    def __getitem__(self, i):
        if i == 0:
            print("start", private_mb(os.getpid()), flush=True)
        path, label = self.samples[i]
        if i == len(self.samples) - 1:
            print("end", private_mb(os.getpid()), flush=True)
        return len(path) + label

n, kind = int(sys.argv[1]), sys.argv[2]
pairs = [(f"train/c{i % 1000:04d}/i{i:08d}.jpg", i % 1000) for i in range(n)]
samples = pairs if kind == "list" else SampleTable.from_pairs(pairs)
del pairs
loader = DataLoader(Samples(samples), batch_size=1024, num_workers=1, multiprocessing_context="fork")
for _ in loader:
    pass
"""


_LOADER = r"""
import sys, time
import torch
from distcls import config
from distcls.data import build_data, train_loader
steps, workers, overrides = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
cfg = config.load(
    None, overrides + ["data.batch_size=64", "data.augment.random_resized_crop=true", "data.augment.hflip=true"]
)
data = build_data(cfg)
loader = train_loader(data.splits.train, 64, 1, 0, 0, torch.device("cpu"), num_workers=workers, max_steps=steps)
loader.sampler.set_epoch(0)
it = iter(loader)
next(it)  # the workers' start and the first batch are not counted
t, n = time.perf_counter(), 0
for batch in it:
    n += len(batch.labels)
print(n / (time.perf_counter() - t))
"""


def _loader_images_per_s(steps: int, workers: int, overrides: list) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _LOADER, str(steps), str(workers), *overrides],
        env=child_env(),
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise UserError(f"the loader measurement ({overrides[0]}) failed: {last_line(out.stderr)}")
    return round(float(out.stdout.split()[-1]), 1)


def _shard_args(shards: Path) -> list:
    """data.train_shards / val_shards of the converter's output (its shards.json names them)."""
    names = sorted(json.loads((shards / "shards.json").read_text())["counts"])
    args = []
    for split in ("train", "val"):
        mine = [n for n in names if n.startswith(f"{split}-")]
        digits = len(mine[0]) - len(f"{split}-.tar")
        args.append(f"data.{split}_shards={shards}/{split}-{{{0:0{digits}d}..{len(mine) - 1:0{digits}d}}}.tar")
    return args


def _worker_growth(n: int, kind: str) -> float:
    out = subprocess.run([sys.executable, "-c", _WORKER, str(n), kind], env=child_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"the worker-memory measurement ({kind}) failed: {last_line(out.stderr)}")
    found = dict(re.findall(r"^(start|end) ([\d.]+)$", out.stdout, re.M))
    return round(float(found["end"]) - float(found["start"]), 1)


def run(args) -> dict:
    if args.files < args.classes or args.classes < 2:
        raise UserError("--files must be at least --classes, and --classes at least 2")
    if args.repeats < 1 or args.nproc < 1:
        raise UserError("--repeats and --nproc must be at least 1")
    strace = shutil.which("strace") if not args.no_strace else None
    tmp = tempfile.mkdtemp(prefix="distcls-datastart-")
    try:
        root = Path(args.tree) if args.tree else Path(tmp) / "tree"
        t0 = time.perf_counter()
        build_tree(root, args.files, args.classes, args.image_width)
        built_s = time.perf_counter() - t0
        env = child_env()
        scan = [
            sys.executable,
            "-c",
            "import time, torchvision; t = time.perf_counter(); "
            f"torchvision.datasets.ImageFolder({str(root / 'train')!r}); "
            "print(time.perf_counter() - t)",
        ]
        walk = [
            sys.executable,
            "-c",
            f"import time; from pathlib import Path; from distcls.data import folder_index; t = time.perf_counter(); "
            f"folder_index.walk(Path({str(root)!r})); print(time.perf_counter() - t)",
        ]
        shards = Path(tmp) / "shards"
        t0 = time.perf_counter()
        shard_size = args.shard_size or max(1, min(1000, args.files // 256))
        converted = subprocess.run(
            [sys.executable, "-m", "distcls.shard", str(root), str(shards), "--shard-size", str(shard_size)],
            env=env,
            capture_output=True,
            text=True,
        )
        if converted.returncode != 0:
            raise UserError(f"python -m distcls.shard failed: {last_line(converted.stderr)}")
        convert_s = time.perf_counter() - t0
        sharded = [*SHARD_RUN, *_shard_args(shards)]
        times = {"torchvision_scan_s": [], "distcls_walk_s": [], "first_start_s": [], "restart_s": [], "digits_s": [],
                 "shards_first_start_s": [], "shards_restart_s": []}
        for r in range(args.repeats):
            times["torchvision_scan_s"].append(
                float(subprocess.run(scan, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
            )
            # (a distcls without the index: no such walk)
            walked = subprocess.run(walk, env=env, capture_output=True, text=True)
            times["distcls_walk_s"].append(float(walked.stdout.split()[-1]) if walked.returncode == 0 else float("nan"))
            out = Path(tmp) / f"run{r}"
            first = train_cmd([*RUN, f"data.root={root}", f"run.out_dir={out}"], args.nproc)
            times["first_start_s"].append(_timed_to_first_step(first, out / "metrics.jsonl", env))
            again = train_cmd(
                [*RUN, f"data.root={root}", f"run.out_dir={out}", "train.epochs=2", "--resume", "auto"], args.nproc
            )
            times["restart_s"].append(_timed_to_first_step(again, out / "metrics.jsonl", env))
            out = Path(tmp) / f"shards{r}"
            times["shards_first_start_s"].append(
                _timed_to_first_step(
                    train_cmd([*sharded, f"run.out_dir={out}"], args.nproc), out / "metrics.jsonl", env
                )
            )
            times["shards_restart_s"].append(
                _timed_to_first_step(
                    train_cmd([*sharded, f"run.out_dir={out}", "train.epochs=2", "--resume", "auto"], args.nproc),
                    out / "metrics.jsonl",
                    env,
                )
            )
            digits = Path(tmp) / f"digits{r}"
            times["digits_s"].append(
                _timed_to_first_step(
                    train_cmd(
                        [
                            "train.epochs=1", "train.max_steps_per_epoch=2", "log.every_steps=1", "log.plots=false",
                            f"run.out_dir={digits}",
                        ],
                        args.nproc,
                    ),
                    digits / "metrics.jsonl",
                    env,
                )
            )
        calls = {}
        if strace:
            calls["torchvision_scan"] = _strace_counts(scan, env)
            out = Path(tmp) / "traced"
            calls["first_start"] = _strace_counts(
                train_cmd([*RUN, f"data.root={root}", f"run.out_dir={out}"], args.nproc), env
            )
            calls["restart"] = _strace_counts(
                train_cmd(
                    [*RUN, f"data.root={root}", f"run.out_dir={out}", "train.epochs=2", "--resume", "auto"], args.nproc
                ),
                env,
            )
            out = Path(tmp) / "traced_shards"
            calls["shards_first_start"] = _strace_counts(train_cmd([*sharded, f"run.out_dir={out}"], args.nproc), env)
            calls["shards_restart"] = _strace_counts(
                train_cmd([*sharded, f"run.out_dir={out}", "train.epochs=2", "--resume", "auto"], args.nproc), env
            )
            digits = Path(tmp) / "traced_digits"
            calls["digits"] = _strace_counts(
                train_cmd(
                    ["train.epochs=1", "train.max_steps_per_epoch=2", "log.plots=false", f"run.out_dir={digits}"],
                    args.nproc,
                ),
                env,
            )
        speed = {}
        if args.loader_steps:
            folder_args = [
                "data.name=imagefolder", f"data.root={root}", "data.image_size=16",
                f"data.index={Path(tmp) / 'speed_index.npz'}",
            ]
            speed = {
                "imagefolder": _loader_images_per_s(args.loader_steps, args.workers, folder_args),
                "webdataset": _loader_images_per_s(
                    args.loader_steps,
                    args.workers,
                    ["data.name=webdataset", "data.image_size=16", "data.shard_streams=8", *_shard_args(shards)],
                ),
            }
        memory = (
            {kind: _worker_growth(args.worker_samples, kind) for kind in ("list", "SampleTable")}
            if args.worker_samples
            else {}
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = args.files + args.classes
    return {
        "mode": "datastart",
        "machine": machine(),
        "files": total,
        "train_files": args.files,
        "classes": args.classes,
        "nproc": args.nproc,
        "repeats": args.repeats,
        "tree_built_s": round(built_s, 1),
        "shard_convert_s": round(convert_s, 1),
        "loader_steps": args.loader_steps,
        "workers": args.workers,
        "images_per_s": speed,
        "image_width": args.image_width,
        "shard_size": shard_size,
        **{k: (round(statistics.median(v), 3) if all(x == x for x in v) else None) for k, v in times.items()},
        "all_s": {k: [round(x, 3) if x == x else None for x in v] for k, v in times.items()},
        "filesystem_calls": calls,
        "worker_samples": args.worker_samples,
        "worker_private_growth_mb": memory,
    }


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=150)
    t = Table(
        title=f"data start-up: {result['files']:,} files in {result['classes']:,} classes, {result['nproc']} rank(s), "
        f"median of {result['repeats']}",
        title_justify="left",
    )
    for col in ("what", "seconds", "openat", "stat", "getdents64", "read"):
        t.add_column(col, justify="left" if col == "what" else "right")
    rows = [("torchvision ImageFolder(train/) scan", "torchvision_scan_s", "torchvision_scan"),
            ("distcls's walk alone (folder_index.walk: train/ and val/)", "distcls_walk_s", "-"),
            ("distcls first start -> first step (walk, divided check, index)", "first_start_s", "first_start"),
            ("distcls restart (--resume auto) -> first step (reads the index)", "restart_s", "restart"),
            ("distcls on its shards: first start -> first step", "shards_first_start_s", "shards_first_start"),
            ("distcls on its shards: restart -> first step", "shards_restart_s", "shards_restart"),
            ("default digits run -> first step", "digits_s", "digits")]
    for label, key, calls in rows:
        c = result["filesystem_calls"].get(calls, {})
        t.add_row(
            label,
            "-" if result[key] is None else f"{result[key]:.3f}",
            *(f"{c[s]:,}" if s in c else "-" for s in SYSCALLS),
        )
    console.print(t)
    speed = result.get("images_per_s")
    if speed:
        console.print(
            f"training loader alone, {result['image_width']} px wide JPEGs, batch 64, {result['workers']} workers, "
            f"{result['loader_steps']} steps: image folder {speed['imagefolder']:,.0f} img/s, its shards "
            f"{speed['webdataset']:,.0f} img/s ({speed['webdataset'] / speed['imagefolder']:.2f}x); written as shards "
            f"of {result['shard_size']} in {result['shard_convert_s']} s"
        )
    mem = result["worker_private_growth_mb"]
    if mem:
        console.print(
            f"DataLoader worker's private memory growth over an epoch of {result['worker_samples']:,} samples: "
            f"list of tuples {mem['list']} MB, SampleTable {mem['SampleTable']} MB"
        )
