"""Start-up cost: `import distcls.train` (and torch) in a fresh process, and command to first training step.

Every figure comes from a fresh `python` process, repeated in interleaved rounds (median kept):
  import_s            time of the import statement itself inside the child (`python -c pass` is the baseline)
  first_step_s        from starting `python -m distcls.train ... log.every_steps=1` to its first
                      metrics.jsonl record (written right after optimizer step 1)
  exit_s              from the same start to process exit (2 steps, then the test evaluation)
Also recorded once (in the first timed `import distcls.train` process, after the timing): which
modules `import distcls.train` loads that are heavy (torchvision, wandb, matplotlib, scikit-learn,
torch._dynamo must not be among them).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distcls.bench.common import child_env, last_line, machine, train_cmd
from distcls.errors import UserError

SYNTHETIC_CIFAR = [
    "data.name=synthetic", "data.synthetic.size=32", "data.synthetic.channels=3", "data.synthetic.train_samples=512",
]
# case name -> overrides (offline data: the bundled digits, or generated CIFAR-shaped images)
CASES = {
    "default (cnn3, digits)": [],
    "cnn2, digits": ["model.name=cnn2"],
    "convnet, digits": ["model.name=convnet", "optim.name=adam", "optim.lr=0.01"],
    "lenet, synthetic 3x32x32": ["model.name=lenet", *SYNTHETIC_CIFAR],
    "resnet18 cifar stem, synthetic 3x32x32": ["model.name=resnet18", "model.cifar_stem=true", *SYNTHETIC_CIFAR],
}
IMPORTS = {"python (no import)": "pass", "torch": "import torch", "distcls.train": "import distcls.train"}
HEAVY = ("torchvision", "wandb", "matplotlib", "sklearn", "torch._dynamo", "PIL", "rich")


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--case", action="append", choices=list(CASES), help="only these cases (repeatable; default all)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every case")


def _import_time(statement: str) -> tuple[float, list]:
    """(seconds of the import statement, the HEAVY modules loaded after it), in one fresh process."""
    code = (f"import sys, time; t = time.perf_counter(); {statement}; seconds = time.perf_counter() - t; "
            f"print(seconds); print(' '.join(m for m in {HEAVY!r} if m in sys.modules) or '-')")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    seconds, heavy = out.stdout.strip().splitlines()[-2:]
    return float(seconds), [m for m in heavy.split() if m != "-"]


def _first_step(overrides: list, out: Path) -> tuple[float, float]:
    cmd = train_cmd(["train.epochs=1", "train.max_steps_per_epoch=2", "log.every_steps=1", "data.val_fraction=0",
                     *overrides, f"run.out_dir={out}"])
    metrics = out / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while first is None and proc.poll() is None:
        if metrics.exists() and metrics.stat().st_size:
            first = time.perf_counter() - t0
        else:
            time.sleep(0.002)
    _, err = proc.communicate()
    exit_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise UserError(f"`{' '.join(cmd[2:])}` exited {proc.returncode}: {last_line(err)}")
    return (first if first is not None else exit_s), exit_s


def run(args) -> dict:
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    cases = {k: CASES[k] for k in (args.case or CASES)}
    imports = {k: [] for k in IMPORTS}
    first = {k: [] for k in cases}
    exits = {k: [] for k in cases}
    heavy = None  # what `import distcls.train` loaded, from its first timed import
    with tempfile.TemporaryDirectory(prefix="distcls-bench-") as tmp:
        for r in range(args.repeats):
            for name, statement in IMPORTS.items():
                seconds, loaded = _import_time(statement)
                imports[name].append(seconds)
                if name == "distcls.train" and heavy is None:
                    heavy = loaded
            for name, overrides in cases.items():
                f, e = _first_step(
                    [*overrides, *args.overrides], Path(tmp) / f"{len(first[name])}_{r}_{abs(hash(name))}"
                )
                first[name].append(f)
                exits[name].append(e)

    def med(d):
        return {k: round(statistics.median(v), 3) for k, v in d.items()}

    return {
        "mode": "startup",
        "machine": machine(),
        "repeats": args.repeats,
        "overrides": list(args.overrides),
        "import_s": med(imports),
        "import_s_all": {k: [round(x, 3) for x in v] for k, v in imports.items()},
        "heavy_modules_loaded_by_import_distcls_train": heavy,
        "command_to_first_step_s": med(first),
        "command_to_first_step_s_all": {k: [round(x, 3) for x in v] for k, v in first.items()},
        "command_to_exit_s": med(exits),
    }


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=150)
    t = Table(title=f"start-up, fresh processes, median of {result['repeats']}", title_justify="left")
    for col in ("what", "seconds (median)", "all"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for k, v in result["import_s"].items():
        t.add_row(f"import {k}" if k != "python (no import)" else "python -c pass (import statement only)", f"{v:.3f}",
                  " ".join(map(str, result["import_s_all"][k])))
    for k, v in result["command_to_first_step_s"].items():
        t.add_row(
            f"command -> first step: {k}", f"{v:.3f}", " ".join(map(str, result["command_to_first_step_s_all"][k]))
        )
    for k, v in result["command_to_exit_s"].items():
        t.add_row(f"command -> exit (2 steps + test): {k}", f"{v:.3f}", "")
    console.print(t)
    console.print(
        "heavy modules loaded by `import distcls.train`: "
        f"{result['heavy_modules_loaded_by_import_distcls_train'] or 'none'}"
    )
