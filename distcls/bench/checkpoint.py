"""Checkpoint costs: ResNet-18 atomic save time, `checkpoint.every_steps` overhead, SIGTERM to exit.

Time to save a ResNet-18 checkpoint (atomic: temp file, fsync, rename, fsync dir), the overhead of
`checkpoint.every_steps` on epoch time (as a ratio measured in the same run, alternating off/on),
and the time from SIGTERM to process exit with a saved checkpoint.

The epoch-time and SIGTERM runs train `--model` (default resnet18, CIFAR stem) on `--samples`
synthetic 3x16x16 images (default 1024) at batch 32; `--rounds` off/on pairs (default 2). The
save is always a ResNet-18 checkpoint (1000 classes), whatever `--model` the runs train.
"""
from __future__ import annotations

import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from distcls.bench.common import child_env, last_line, machine, run_train, summary, train_cmd
from distcls.cli import positive_int
from distcls.errors import UserError

BATCH, EVERY = 32, 5  # global batch of the runs; checkpoint.every_steps of the "on" runs
SIGTERM_AFTER_STEPS = 5  # the SIGTERM run is stopped once this many steps are in its metrics.jsonl
SIGTERM_WAIT_S = 120


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions of each save (default 5)")
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=1024,
        help="synthetic training images of the epoch-time and SIGTERM runs (default 1024; at least "
             f"{BATCH * (EVERY + 1)} "
        f"so that an epoch of batch {BATCH} holds a mid-epoch checkpoint every {EVERY} steps)",
    )
    parser.add_argument(
        "--model", default="resnet18", help="model.name of the epoch-time and SIGTERM runs (default resnet18)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=2, help="alternated off/on pairs of epoch-time runs (default 2)"
    )


def run(args) -> dict:
    if args.samples // BATCH <= EVERY:
        raise UserError(
            f"--samples {args.samples} gives {args.samples // BATCH} steps of batch {BATCH}: an epoch needs more than "
            f"{EVERY} for a mid-epoch checkpoint; use --samples {BATCH * (EVERY + 1)} or more"
        )
    with tempfile.TemporaryDirectory(prefix="distcls-bench-") as tmp:
        return {"mode": "checkpoint", "machine": machine(),
                **bench_checkpoint(Path(tmp), args.repeats, args.samples, args.model, args.rounds)}


def bench_checkpoint(
    workdir: Path, repeats: int, samples: int = 1024, model_name: str = "resnet18", rounds: int = 2
) -> dict:
    import torch
    import torchvision

    from distcls.checkpoint import CheckpointFiles, rng_state

    model = torchvision.models.resnet18(num_classes=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()  # momentum buffers exist, as in a real checkpoint
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": {},
        "scaler": {},
        "epoch": 1,
        "step": 1,
        "epoch_step": 0,
        "best_metric": 0.0,
        "config": {},
        "data_spec": {},
        "rng": rng_state(),
        "version": 1,
    }
    store = CheckpointFiles(workdir / "ckpt", keep=1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        store.write(state, epoch_file=False, best_file=False)
        times.append(time.perf_counter() - t)
    size_mb = store.last.stat().st_size / 2 ** 20

    # Overhead of mid-epoch checkpoints on epoch time: epochs with checkpoint.every_steps off and
    # on, alternated (off, on, off, on, ...) so drift of the machine hits both alike. No plots:
    # they come after the timed epoch (and a run stopped by SIGTERM writes none anyway).
    batch, every = BATCH, EVERY
    common = [
        "data.name=synthetic", f"data.synthetic.train_samples={samples}", f"data.batch_size={batch}",
        f"model.name={model_name}", "model.cifar_stem=true", "data.synthetic.size=16", "train.epochs=1",
        "log.every_steps=0", "data.val_fraction=0", "log.plots=false",
    ]
    epoch_s, steps = {0: [], every: []}, None
    for i, k in enumerate([0, every] * rounds):
        out = workdir / f"every{k}_{i}"
        run_train([*common, f"checkpoint.every_steps={k}", f"run.out_dir={out}"])
        s = summary(out)
        steps = s["global_step"] // s["epochs_completed"]  # the run's own count (the whole train split: val_fraction=0)
        epoch_s[k].append(steps * batch / s["train_images_per_sec"])
    off, on = statistics.median(epoch_s[0]), statistics.median(epoch_s[every])

    # SIGTERM -> exit: a run stopped mid-epoch (the save is part of the time). It has epochs to
    # spare, so that even a tiny --samples cannot end it before the signal comes.
    out = workdir / "sigterm"
    proc = subprocess.Popen(
        train_cmd([*common, "train.epochs=100", "log.every_steps=1", f"run.out_dir={out}"]),
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= SIGTERM_AFTER_STEPS):
        time.sleep(0.01)
    if proc.poll() is not None:
        raise UserError(
            f"the SIGTERM run exited {proc.returncode} before it was sent SIGTERM: {last_line(proc.stderr.read())}"
        )
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=SIGTERM_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise UserError(f"the SIGTERM run was still running {SIGTERM_WAIT_S} s after SIGTERM (killed)") from None
    sigterm_s = time.perf_counter() - t
    saved = (
        torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        if proc.returncode == 3
        else {}
    )
    return {
        "setup": {"model": model_name, "samples": samples, "batch": batch, "rounds": rounds, "save_repeats": repeats},
        "resnet18_checkpoint_mb": round(size_mb, 1),
        "resnet18_save_s_median": round(statistics.median(times), 4),
        "resnet18_save_s_all": [round(x, 4) for x in times],
        "steps_per_epoch": steps,
        "checkpoints_per_epoch": (steps - 1) // every,
        "epoch_s_no_step_checkpoints": [round(x, 3) for x in epoch_s[0]],
        f"epoch_s_checkpoint_every_{every}_steps": [round(x, 3) for x in epoch_s[every]],
        f"epoch_time_ratio_every_{every}_steps": round(on / off, 3),
        "sigterm_to_exit_s": round(sigterm_s, 3),
        "sigterm_exit_code": proc.returncode,
        # where the stopped run's checkpoint resumes (mid-epoch unless the epoch ended before the signal was handled)
        "sigterm_saved_at": {k: saved.get(k) for k in ("epoch", "epoch_step", "step")},
    }
