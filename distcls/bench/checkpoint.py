"""Checkpoint costs: ResNet-18 atomic save time, `checkpoint.every_steps` overhead, SIGTERM to exit.

Time to save a ResNet-18 checkpoint (atomic: temp file, fsync, rename, fsync dir), the overhead of
`checkpoint.every_steps` on epoch time (as a ratio measured in the same run, alternating off/on),
and the time from SIGTERM to process exit with a saved checkpoint.
"""
from __future__ import annotations

import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from distcls.bench.common import child_env, machine, run_train, summary, train_cmd


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each save")


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="distcls-bench-") as tmp:
        return {"mode": "checkpoint", "machine": machine(), **bench_checkpoint(Path(tmp), args.repeats)}


def bench_checkpoint(workdir: Path, repeats: int) -> dict:
    import torch
    import torchvision

    from distcls.checkpoint import CheckpointFiles, rng_state

    model = torchvision.models.resnet18(num_classes=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()  # momentum buffers exist, as in a real checkpoint
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {}, "scaler": {}, "epoch": 1, "step": 1,
             "epoch_step": 0, "best_metric": 0.0, "config": {}, "data_spec": {}, "rng": rng_state(), "version": 1}
    store = CheckpointFiles(workdir / "ckpt", keep=1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        store.write(state, epoch_file=False, best_file=False)
        times.append(time.perf_counter() - t)
    size_mb = store.last.stat().st_size / 2 ** 20

    # Overhead of mid-epoch checkpoints on epoch time: ResNet-18 epochs with checkpoint.every_steps
    # off and on, alternated (off, on, off, on) so drift of the machine hits both alike.
    samples, batch, every = 1024, 32, 5
    steps = int(samples * 0.9) // batch
    common = ["data.name=synthetic", f"data.synthetic.train_samples={samples}", f"data.batch_size={batch}", "model.name=resnet18",
              "model.cifar_stem=true", "data.synthetic.size=16", "train.epochs=1", "log.every_steps=0", "data.val_fraction=0"]
    epoch_s = {0: [], every: []}
    for i, k in enumerate([0, every, 0, every]):
        out = workdir / f"every{k}_{i}"
        run_train([*common, f"checkpoint.every_steps={k}", f"run.out_dir={out}"])
        epoch_s[k].append(steps * batch / summary(out)["train_images_per_sec"])
    off, on = statistics.median(epoch_s[0]), statistics.median(epoch_s[every])

    # SIGTERM -> exit: a ResNet-18 run stopped mid-epoch (the save is part of the time).
    out = workdir / "sigterm"
    proc = subprocess.Popen(train_cmd([*common, "train.epochs=3", "log.every_steps=1", f"run.out_dir={out}"]), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        time.sleep(0.01)
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    sigterm_s = time.perf_counter() - t
    return {
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
    }
