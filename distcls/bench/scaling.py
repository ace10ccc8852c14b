"""The same config at world size 1 and 2: `python -m distcls.train` (torchrun for 2) beside a hand-written DDP loop.

Each round runs distcls and the hand-written loop (`distcls/bench/ddp_loop.py`) at world size 1
(one plain process) and 2 (torchrun, gloo on CPU, NCCL on GPUs), in rotated order. Images/s are
the global images per second of every epoch after the first (warm-up); distcls's come from its
own metrics.jsonl. Child processes get OMP_NUM_THREADS=1 unless it is set (torchrun's own default
for several processes), so on CPU world size 2 uses twice the cores of world size 1.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from distcls.bench.common import child_env, machine, module_cmd, run_quiet, train_cmd
from distcls.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the built-in default config)")
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per run; the first is warm-up (default 3, at least 2)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")


def _distcls(args, common: list, nproc: int, out: Path) -> dict:
    from distcls.tracking import read_jsonl

    seconds = run_quiet(train_cmd([*common, f"run.out_dir={out}"], nproc))
    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train" and "skipped_steps" in r]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "images_per_sec": statistics.median(r["images_per_sec"] for r in epochs[1:]),
        "test_acc": summary["test_acc"],
        "command_to_exit_s": seconds,
    }


def _hand(args, nproc: int, out: Path) -> dict:
    cfg = ["--config", args.config] if args.config else []
    loop = [*cfg, "--epochs", str(args.epochs), "--out", str(out), *args.overrides]
    seconds = run_quiet(module_cmd("distcls.bench.ddp_loop", loop, nproc))
    return {"images_per_sec": json.loads(out.read_text())["images_per_sec"], "command_to_exit_s": seconds}


def run(args) -> dict:
    if args.epochs < 2 or args.rounds < 1:
        raise UserError("--epochs must be at least 2 (the first is warm-up) and --rounds at least 1")
    cfg_args = ["--config", args.config] if args.config else []
    common = [
        *cfg_args, f"train.epochs={args.epochs}", "log.every_steps=0", "checkpoint.every_epochs=0", *args.overrides,
    ]
    runs = {"distcls_w1": (True, 1), "hand_w1": (False, 1), "distcls_w2": (True, 2), "hand_w2": (False, 2)}
    results = {k: [] for k in runs}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="distcls-bench-") as tmp:
        order = list(runs)
        for r in range(args.rounds):
            for k in order[r % len(order):] + order[:r % len(order)]:
                is_distcls, nproc = runs[k]
                out = Path(tmp) / f"{k}_{r}"
                results[k].append(
                    _distcls(args, common, nproc, out) if is_distcls else _hand(args, nproc, out.with_suffix(".json"))
                )
    ips = {k: [round(x["images_per_sec"], 1) for x in v] for k, v in results.items()}

    def per_round(a, b):
        return [round(x / y, 3) for x, y in zip(ips[a], ips[b])]

    ratios = {
        "distcls_w2/w1": per_round("distcls_w2", "distcls_w1"),
        "hand_w2/w1": per_round("hand_w2", "hand_w1"),
        "distcls/hand_w1": per_round("distcls_w1", "hand_w1"),
        "distcls/hand_w2": per_round("distcls_w2", "hand_w2"),
    }
    return {
        "mode": "scaling",
        "machine": machine(),
        "setup": {
            "config": args.config,
            "overrides": list(args.overrides),
            "epochs": args.epochs,
            "rounds": args.rounds,
            "OMP_NUM_THREADS": child_env()["OMP_NUM_THREADS"],
        },
        "images_per_sec": ips,
        "median_images_per_sec": {k: round(statistics.median(v), 1) for k, v in ips.items()},
        "ratios": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "per_round_ratios": ratios,
        "distcls_test_acc": {
            k: [round(x["test_acc"], 4) for x in v] for k, v in results.items() if k.startswith("distcls")
        },
        "command_to_exit_s": {k: [round(x["command_to_exit_s"], 2) for x in v] for k, v in results.items()},
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["setup"]
    table = Table(
        title=f"scaling: {s['config'] or 'default config'} {' '.join(s['overrides'])}; {s['rounds']} rounds, "
        f"{s['epochs']} epochs (first = warm-up), OMP_NUM_THREADS={s['OMP_NUM_THREADS']}",
        title_justify="left",
    )
    for col in ("run", "world 1 images/s", "world 2 images/s", "world 2 / world 1", "per round"):
        table.add_column(col, justify="left" if col == "run" else "right")
    med, ratios, per = result["median_images_per_sec"], result["ratios"], result["per_round_ratios"]
    for name, key in (("distcls (python -m distcls.train / torchrun)", "distcls"), ("hand-written DDP loop", "hand")):
        table.add_row(name, f"{med[key + '_w1']:,.0f}", f"{med[key + '_w2']:,.0f}", f"{ratios[key + '_w2/w1']:.3f}",
                      " ".join(map(str, per[key + "_w2/w1"])))
    table.add_row(
        "distcls / hand-written", f"{ratios['distcls/hand_w1']:.3f}", f"{ratios['distcls/hand_w2']:.3f}", "", ""
    )
    console = Console() if Console().is_terminal else Console(width=150)
    console.print(table)
    load = result["load_average_1min"]
    console.print(f"distcls test acc {result['distcls_test_acc']}; command to exit (s) {result['command_to_exit_s']}; "
                  f"load average {load['before']} -> {load['after']}")
