"""gpu: the whole device check in one command, within a time budget: one JSON, one table.

In this order, each part in its own process with its own time cap, and none started that the
budget (`--budget-s`, default 450 s) can no longer hold (it is listed as skipped, with the
`--parts` name that runs it alone in a second call):
  tests                     python -m pytest -m gpu tests/test_gpu.py (the CUDA paths; counts and failures)
  compare:r18               bench compare, ResNet-18 CIFAR stem, synthetic 3x32x32, global batch 512,
                            bf16, channels_last, crop 4 + flip, cudnn.benchmark and TF32 on
  compare:r50               bench compare, ResNet-50 at 224 px, batch 256, bf16, channels_last, flip
  imagefolder               bench imagefolder on 3,000 generated JPEGs of 300-500 px, 14 workers:
                            distcls vs data.gpu_decode=true vs torchvision ImageFolder + DataLoader,
                            feeding ResNet-50 bf16 channels_last at batch 256, each against the
                            same steps on a batch already on the GPU (the synthetic-input capacity)
  startup                   command to exit of seed A's net (cnn2) on FashionMNIST-layout IDX
                            files (60,000 + 10,000 generated images) at bf16, 2 steps + evaluation
  compare:r18-no-benchmark  the compare cases again with train.cudnn_benchmark=false, with
  compare:r18-compile ...   train.compile=true and with train.tf32=false (ResNet-50's compile
  compare:r50-compile       last: it costs the most)
Each part's time on an H200 is estimated in PARTS (steps x expected step time + process start).
Without CUDA (or with --cpu-smoke) it runs a reduced plan end to end on the CPU (tiny sizes; the
GPU tests skip with their reason) and lists every GPU-only part as skipped with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from distcls.bench.common import machine
from distcls.errors import UserError

REPO = Path(__file__).resolve().parents[2]
WORKERS = 14  # DataLoader workers on the 16-core GPU machine (two cores for the training process)

R18 = [
    "model.name=resnet18", "model.cifar_stem=true", "data.name=synthetic", "data.synthetic.size=32",
    "data.synthetic.channels=3", "data.synthetic.train_samples=13312", "data.synthetic.test_samples=128",
    "data.val_fraction=0", "data.batch_size=512", "train.amp=bf16", "train.channels_last=true",
    "data.augment.crop_padding=4", "data.augment.hflip=true",
]
R50 = [
    "model.name=resnet50", "data.name=synthetic", "data.synthetic.size=224", "data.synthetic.channels=3",
    "data.synthetic.train_samples=3072", "data.synthetic.test_samples=32", "data.val_fraction=0", "data.batch_size=256",
    "train.amp=bf16", "train.channels_last=true", "data.augment.hflip=true",
]
FAST_SWITCHES = ["train.cudnn_benchmark=true", "train.tf32=true"]
R18_RUN = ["--steps", "20", "--warmup", "5", "--rounds", "3", "--workers", str(WORKERS)]  # 25 steps x ~12 ms per run
R50_RUN = ["--steps", "8", "--warmup", "3", "--rounds", "3", "--workers", str(WORKERS)]  # 11 steps x ~65 ms per run
VARIANTS = {
    "no-tf32": ["train.tf32=false"],
    "no-benchmark": ["train.cudnn_benchmark=false"],
    "compile": ["train.compile=true"],
}
GOAL_A_OVER_B, GOAL_FOLDER_OVER_SYNTHETIC = 0.97, 0.90


@dataclass
class Part:
    name: str
    kind: str  # tests | compare | imagefolder | startup
    args: list = field(default_factory=list)
    cap_s: int = 60  # its time limit
    min_s: int = 20  # not started with less than this left in the budget
    gpu_only: bool = False


def gpu_plan() -> list:
    """The H200 plan; cap_s from estimates: process start + data ~10-15 s per part, steps x step time."""
    plan = [
        Part("tests", "tests", cap_s=200, min_s=60),
        # --profile: torch.profiler tables of a and b and a's host-sync calls, the evidence for any gap
        Part(
            "compare:r18",
            "compare",
            [*R18_RUN, "--profile", "5", *R18, *FAST_SWITCHES],
            cap_s=60,
            min_s=30,
            gpu_only=True,
        ),
        Part(
            "compare:r50",
            "compare",
            [*R50_RUN, "--profile", "5", *R50, *FAST_SWITCHES],
            cap_s=75,
            min_s=40,
            gpu_only=True,
        ),
        Part(
            "imagefolder",
            "imagefolder",
            [
                "--images",
                "3000",
                "--classes",
                "10",
                "--workers",
                str(WORKERS),
                "--batch",
                "256",
                "--size",
                "224",
                "--repeats",
                "2",
                "--model",
                "resnet50",
                "--steps",
                "100",
                "--train-batch",
                "256",
                "--amp",
                "bf16",
                "--channels-last",
                "--device",
                "cuda",
            ],
            cap_s=120,
            min_s=60,
            gpu_only=True,
        ),
        Part("startup", "startup", ["60000", "10000", "3"], cap_s=60, min_s=30),
    ]

    def case(model: str, variant: str, cap_s: int, min_s: int) -> Part:
        base, run = (R18, R18_RUN) if model == "r18" else (R50, R50_RUN)
        # after the compile itself, two rounds tell the speed
        rounds = ["--rounds", "2"] if variant == "compile" else []
        return Part(f"compare:{model}-{variant}", "compare", [*run, *rounds, *base, *FAST_SWITCHES, *VARIANTS[variant]],
                    cap_s=cap_s, min_s=min_s, gpu_only=True)

    # cudnn.benchmark and compile first (they move a/b most), TF32 after (under bf16 autocast it only
    # touches the ops autocast keeps in float32), ResNet-50's compile last (the most expensive part)
    plan += [case("r18", "no-benchmark", 45, 30), case("r50", "no-benchmark", 60, 40), case("r18", "compile", 150, 90),
             case("r18", "no-tf32", 45, 30), case("r50", "no-tf32", 60, 40), case("r50", "compile", 180, 120)]
    return plan


def smoke_plan() -> list:
    """The same parts at tiny sizes on the CPU: every code path of the script runs end to end (its
    only job: the plan runs; each bench mode's own figures are checked by tests/test_bench.py).
    The imagefolder part decodes in the main process (--workers 0) over the fewest JPEGs whose
    1% test split is not empty; the startup run writes no plots."""
    return [
        Part("tests", "tests", cap_s=240, min_s=10),
        Part(
            "compare:smoke",
            "compare",
            [
                "--steps", "2", "--warmup", "1", "--rounds", "1", "--workers", "0", "--threads", "1",
                "data.batch_size=32", "data.val_fraction=0",
            ],
            cap_s=240,
            min_s=10,
        ),
        Part(
            "imagefolder",
            "imagefolder",
            [
                "--images", "52", "--classes", "2", "--workers", "0", "--batch", "8", "--size", "32", "--repeats", "1",
                "--steps", "1", "--train-batch", "8", "--model", "resnet18",
            ],
            cap_s=240,
            min_s=10,
        ),
        Part("startup", "startup", ["256", "64", "1", "dist.device=cpu", "log.plots=false"], cap_s=240, min_s=10),
    ]


def add_arguments(parser) -> None:
    parser.add_argument(
        "--budget-s", type=float, default=450, help="wall-clock budget of the whole check in seconds (default 450)"
    )
    parser.add_argument(
        "--parts", help="comma-separated part names to run (default all; e.g. compare:r50-compile for a second call)"
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="the reduced CPU plan even where CUDA is available (automatic without CUDA)",
    )


# --------------------------------------------------------------------------- running a part


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd: list, timeout: float, log: Path) -> tuple[Optional[int], float]:
    """(exit code or None on timeout, seconds). The child gets its own process group: on timeout
    it is killed with every process it started (DataLoader workers, torchrun's ranks)."""
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, time.perf_counter() - t


def _tail(log: Path, chars: int = 1500) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return text[-chars:]


def _pytest_counts(xml: Path) -> dict:
    """passed / failed / skipped counts, failure messages and skip reasons from pytest's JUnit XML."""
    root = ET.parse(xml).getroot()
    counts, failures, skips = {"passed": 0, "failed": 0, "skipped": 0}, [], set()
    for case in root.iter("testcase"):
        name = f"{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "")[:600]})
        elif skipped is not None:
            counts["skipped"] += 1
            skips.add((skipped.get("message") or "")[:300])
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": sorted(skips)}


def _pytest_log_counts(text: str) -> dict:
    """Outcomes from `pytest -v` lines (for a run killed at its cap: no JUnit XML then), and the test it was in."""
    import re

    counts = {"passed": 0, "failed": 0, "skipped": 0}
    running = None
    for line in text.splitlines():
        m = re.match(r"^(tests/\S+::\S+)(?: (PASSED|FAILED|SKIPPED|ERROR))?", line)
        if m:
            outcome = m.group(2)
            running = None if outcome else m.group(1)
            if outcome:
                counts[{"PASSED": "passed", "SKIPPED": "skipped"}.get(outcome, "failed")] += 1
    return {**counts, "running_at_the_cap": running}


def run_tests(part: Part, tmp: Path, timeout: float) -> dict:
    if not (REPO / "tests" / "test_gpu.py").exists():
        return {
            "status": "skipped",
            "reason": f"{REPO / 'tests/test_gpu.py'} not found (an installed package without its tests)",
        }
    xml = tmp / "tests.xml"
    cmd = [
        sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "tests/test_gpu.py",
        f"--junitxml={xml}",
    ]
    code, seconds = _run(cmd, timeout, tmp / "tests.log")
    if code is None or not xml.exists():
        partial = _pytest_log_counts(_tail(tmp / "tests.log", 200_000))
        return {
            "status": "timeout" if code is None else "failed",
            "seconds": seconds,
            "command": cmd,
            "result": partial,
            "headline": (
                f"{partial['passed']} passed, {partial['failed']} failed, {partial['skipped']} skipped before the cap"
                f"{'; running ' + partial['running_at_the_cap'] if partial['running_at_the_cap'] else ''}"
            ),
            "error": _tail(tmp / "tests.log"),
        }
    result = _pytest_counts(xml)
    status = "ok" if result["failed"] == 0 and code in (0, 5) else "failed"
    headline = f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped"
    if result["failures"]:
        headline += ": " + ", ".join(f["test"] for f in result["failures"])
    elif result["skipped"] and not result["passed"]:
        headline += f" ({'; '.join(result['skip_reasons'])[:160]})"
    goal = None if result["passed"] == result["failed"] == 0 else ("met" if result["failed"] == 0 else "NOT met")
    return {"status": status, "seconds": seconds, "command": cmd, "result": result, "headline": headline,
            "goal": goal and f"every GPU test passes: {goal}"}


def _bench_child(mode: str, args: list, tmp: Path, name: str, timeout: float) -> dict:
    out = tmp / f"{name.replace(':', '_')}.json"
    cmd = [sys.executable, "-m", "distcls.bench", mode, *args, "--out", str(out)]
    code, seconds = _run(cmd, timeout, tmp / f"{name.replace(':', '_')}.log")
    if code != 0 or not out.exists():
        return {"status": "timeout" if code is None else "failed", "seconds": seconds, "command": cmd,
                "error": _tail(tmp / f"{name.replace(':', '_')}.log")}
    return {"status": "ok", "seconds": seconds, "command": cmd, "result": json.loads(out.read_text())}


def run_compare(part: Part, tmp: Path, timeout: float) -> dict:
    record = _bench_child("compare", part.args, tmp, part.name, timeout)
    if record["status"] != "ok":
        return record
    r = record["result"]
    med, ratios = r["median_images_per_sec"], r["ratios"]
    record["headline"] = (f"a {med['a']:,.0f} / b {med['b']:,.0f} / c {med['c']:,.0f} img/s; a/b {ratios['a/b']} "
                          f"(rounds {r['per_round_ratios']['a/b']}), a/c {ratios['a/c']}, a/d {ratios['a/d']}")
    if "profile" in r:
        record["headline"] += (
            f"; host syncs in {r['profile']['a']['steps']} steps of a: {r['profile']['a']['host_syncs'] or 'none'}"
        )
    if part.gpu_only:
        record["goal"] = f"a/b >= {GOAL_A_OVER_B}: {'met' if ratios['a/b'] >= GOAL_A_OVER_B else 'NOT met'}"
    return record


def write_jpeg_folder(root: Path, n: int, classes: int, workers: int) -> Path:
    """bench imagefolder's generated JPEGs, written by `workers` processes (chunks merged into one folder)."""
    from concurrent.futures import ProcessPoolExecutor

    from distcls.bench.imagefolder import write_jpegs

    chunks = [(root.parent / f"{root.name}_chunk{k}", len(range(k, n, workers)), classes, k) for k in range(workers)]
    chunks = [c for c in chunks if c[1] > 0]
    with ProcessPoolExecutor(max_workers=len(chunks)) as pool:
        list(pool.map(write_jpegs, *zip(*chunks)))
    for chunk, *_ in chunks:
        for f in chunk.rglob("*.jpg"):
            (root / f.parent.name).mkdir(parents=True, exist_ok=True)
            f.rename(root / f.parent.name / f"{chunk.name[-8:]}_{f.name}")
        shutil.rmtree(chunk)
    return root


def _arg(args: list, flag: str, default=None):
    return args[args.index(flag) + 1] if flag in args else default


def run_imagefolder(part: Part, tmp: Path, timeout: float, cuda: bool) -> dict:
    t = time.perf_counter()
    root = write_jpeg_folder(
        tmp / "jpegs", int(_arg(part.args, "--images")), int(_arg(part.args, "--classes")), os.cpu_count() or 1
    )
    generate_s = time.perf_counter() - t
    record = _bench_child("imagefolder", [*part.args, "--root", str(root)], tmp, part.name, timeout - generate_s)
    record["generate_s"] = round(generate_s, 1)
    record["seconds"] = record.get("seconds", 0) + generate_s
    if record["status"] != "ok":
        return record
    r = record["result"]
    pipe = r["pipeline_images_per_sec"]
    names = [k for k in ("distcls", "distcls_gpu_decode", "torchvision") if k in pipe]
    headline = "pipeline img/s: " + ", ".join(f"{k} {pipe[k]['median']:,.0f}" for k in names)
    train = r.get(f"train_{_arg(part.args, '--model', 'resnet18')}_images_per_sec")
    if train:
        over = train.get("ratio_over_synthetic", {})
        headline += (
            f"; train img/s ({_arg(part.args, '--model', 'resnet18')}, amp {_arg(part.args, '--amp', 'none')}): "
            + ", ".join(f"{k} {train[k]['median']:,.0f} ({over.get(k, '-')} of synthetic)" for k in names)
            + f"; synthetic {train['synthetic']['median']:,.0f}"
        )
        best = max(v for k, v in over.items() if k.startswith("distcls")) if over else None
        if cuda and best is not None:
            record["goal"] = (
                f"best distcls / synthetic >= {GOAL_FOLDER_OVER_SYNTHETIC}: "
                f"{'met' if best >= GOAL_FOLDER_OVER_SYNTHETIC else 'NOT met'} ({best})"
            )
    if not cuda:
        headline += "; data.gpu_decode=true: GPU only, not measured"
    record["headline"] = headline
    return record


def write_fashion_mnist(root: Path, train: int, test: int) -> Path:
    """FashionMNIST-layout IDX files (<root>/FashionMNIST/raw/), random 28x28 images, 10 classes."""
    import numpy as np

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                            ("labels-idx1", rng.integers(0, 10, (n,), dtype=np.uint8))):
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())
    return root


def run_startup(part: Part, tmp: Path, deadline: float) -> dict:
    """`python -m distcls.train --config configs/fashion_mnist_cnn2.yaml train.amp=bf16` for 2 steps:
    command to first step (its first metrics.jsonl record) and to exit, fresh processes."""
    from distcls.bench.common import train_cmd

    started = time.perf_counter()
    train, test, repeats, *overrides = part.args
    root = write_fashion_mnist(tmp / "fashion", int(train), int(test))
    first, exits, cmd = [], [], None
    for r in range(int(repeats)):
        out = tmp / f"startup_{r}"
        cmd = train_cmd(
            [
                "--config",
                str(REPO / "configs/fashion_mnist_cnn2.yaml"),
                f"data.root={root}",
                "train.amp=bf16",
                "train.epochs=1",
                "train.max_steps_per_epoch=2",
                "log.every_steps=1",
                *overrides,
                f"run.out_dir={out}",
            ]
        )
        metrics, t0 = out / "metrics.jsonl", time.perf_counter()
        with open(tmp / f"startup_{r}.log", "w") as log:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
            )
            seen = None
            while proc.poll() is None and time.perf_counter() < deadline:
                if seen is None and metrics.exists() and metrics.stat().st_size:
                    seen = time.perf_counter() - t0
                time.sleep(0.005)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if not exits:
                    return {
                        "status": "timeout",
                        "seconds": time.perf_counter() - t0,
                        "command": cmd,
                        "error": _tail(tmp / f"startup_{r}.log"),
                    }
                break  # the cap: keep the repeats that finished
        exit_s = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"status": "failed", "seconds": exit_s, "command": cmd, "error": _tail(tmp / f"startup_{r}.log")}
        first.append(round(seen if seen is not None else exit_s, 3))
        exits.append(round(exit_s, 3))
    med = sorted(exits)[(len(exits) - 1) // 2]
    return {
        "status": "ok",
        "seconds": time.perf_counter() - started,
        "command": cmd,
        "result": {
            "command_to_first_step_s": first,
            "command_to_exit_s": exits,
            "median_exit_s": med,
            "train_images": int(train),
            "test_images": int(test),
        },
        "headline": (
            f"seed A cnn2, FashionMNIST layout ({int(train):,} + {int(test):,} images), bf16, 2 steps + evaluation: "
            f"command to exit {med:.2f} s (median of {exits}); "
            f"to first step {sorted(first)[(len(first) - 1) // 2]:.2f} s"
        ),
    }


# --------------------------------------------------------------------------- the plan


def run(args) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    plan = gpu_plan() if cuda else smoke_plan()
    if not cuda:  # the GPU-only parts, listed so the table says what was not measured
        plan += [p for p in gpu_plan() if p.gpu_only and p.name not in {q.name for q in plan}]
    wanted = [s.strip() for s in args.parts.split(",")] if args.parts else None
    known = {p.name for p in gpu_plan() + smoke_plan()}
    if wanted and not set(wanted) <= known:
        raise UserError(
            f"--parts: unknown part(s) {sorted(set(wanted) - known)}; the parts are {', '.join(sorted(known))}"
        )
    if args.budget_s <= 0:
        raise UserError("--budget-s must be positive")
    start = time.perf_counter()
    deadline = start + args.budget_s
    result = {
        "mode": "gpu",
        "machine": machine(),
        "cuda": cuda,
        "smoke": not cuda,
        "budget_s": args.budget_s,
        "parts": [],
    }
    device = (
        "CUDA: " + torch.cuda.get_device_name(0) if cuda else "no CUDA device: reduced CPU plan, GPU-only parts skipped"
    )
    print(
        f"distcls GPU check: {device}; budget {args.budget_s:.0f} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="distcls-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        for part in plan:
            left = deadline - time.perf_counter()
            if wanted and part.name not in wanted:
                continue
            if part.gpu_only and not cuda:
                record = {"status": "skipped", "reason": "GPU only: no CUDA device"}
            elif left < part.min_s:
                record = {"status": "skipped", "reason": f"out of budget ({left:.0f} s left, needs ~{part.min_s} s): "
                                                          f"rerun with --parts {part.name}"}
            else:
                timeout = min(part.cap_s, left)
                try:
                    if part.kind == "tests":
                        record = run_tests(part, tmp, timeout)
                    elif part.kind == "compare":
                        record = run_compare(part, tmp, timeout)
                    elif part.kind == "imagefolder":
                        record = run_imagefolder(part, tmp, timeout, cuda)
                    else:
                        record = run_startup(part, tmp, time.perf_counter() + timeout)
                except Exception as exc:  # one broken part must not lose the others' results
                    record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            record = {"name": part.name, "kind": part.kind, **record}
            if "seconds" in record:
                record["seconds"] = round(record["seconds"], 1)
            result["parts"].append(record)
            last_error_line = ((record.get("error") or "").strip().splitlines() or [""])[-1]
            print(
                f"  {part.name}: {record['status']}"
                + (f" in {record['seconds']:.0f} s" if "seconds" in record else "")
                + f": {record.get('headline') or record.get('reason') or last_error_line}",
                flush=True,
            )
            result["elapsed_s"] = round(time.perf_counter() - start, 1)
            if args.out:  # written after every part: a check killed from outside keeps what it measured
                from distcls.runtime.atomic_files import atomic_write_text
                atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    return result


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console() if Console().is_terminal else Console(width=200)
    title = (
        f"distcls GPU check ({result['machine'].get('gpu', 'no GPU: CPU smoke run')}), {result['elapsed_s']:.0f} s "
        f"of a {result['budget_s']:.0f} s budget"
    )
    table = Table(title=title, title_justify="left")
    for col in ("part", "status", "s", "result", "goal"):
        table.add_column(col, justify="right" if col == "s" else "left", overflow="fold")
    for p in result["parts"]:
        text = p.get("headline") or p.get("reason") or (p.get("error") or "").strip()[-300:]
        table.add_row(
            p["name"],
            p["status"],
            f"{p['seconds']:.0f}" if "seconds" in p else "-",
            Text(text),
            Text(p.get("goal") or ""),
        )
    console.print(table)
