"""`python -m distcls.bench [checkpoint|throughput] [--out FILE]`: measurements behind performance claims.

checkpoint  time to save a ResNet-18 checkpoint (atomic: temp file, fsync, rename, fsync dir),
            the overhead of `checkpoint.every_steps` on epoch time (as a ratio measured in the
            same run), and the time from SIGTERM to process exit with a saved checkpoint.
throughput  training images/sec of the default config at world size 1 and 2 (gloo on CPU).

Numbers are printed as one JSON object (and written to --out); they are never test thresholds.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from distcls.cli import ArgumentParser, exit_with


def _train_cmd(args, nproc: int = 1) -> list:
    if nproc == 1:
        return [sys.executable, "-m", "distcls.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "distcls.train", *args]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _run(args, nproc=1) -> None:
    subprocess.run(_train_cmd(args, nproc), check=True, env=_env(), stdout=subprocess.DEVNULL)


def bench_checkpoint(workdir: Path, repeats: int) -> dict:
    import torch
    import torchvision

    from distcls.checkpoint import CheckpointStore, rng_state

    model = torchvision.models.resnet18(num_classes=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()  # momentum buffers exist, as in a real checkpoint
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {}, "scaler": {}, "epoch": 1, "step": 1,
             "epoch_step": 0, "best_metric": 0.0, "config": {}, "data_spec": {}, "rng": rng_state(), "version": 1}
    store = CheckpointStore(workdir / "ckpt", keep=1, is_main=True)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        store.save(state, epoch_file=False, is_best=False)
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
        _run([*common, f"checkpoint.every_steps={k}", f"run.out_dir={out}"])
        epoch_s[k].append(steps * batch / _summary(out)["train_images_per_sec"])
    off, on = statistics.median(epoch_s[0]), statistics.median(epoch_s[every])

    # SIGTERM -> exit: a ResNet-18 run stopped mid-epoch (the save is part of the time).
    out = workdir / "sigterm"
    proc = subprocess.Popen(_train_cmd([*common, "train.epochs=3", "log.every_steps=1", f"run.out_dir={out}"]), env=_env(),
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


def bench_throughput(workdir: Path) -> dict:
    result = {}
    for nproc in (1, 2):
        out = workdir / f"w{nproc}"
        _run(["train.epochs=3", "log.every_steps=0", f"run.out_dir={out}"], nproc)
        s = _summary(out)
        result[f"world_{nproc}_images_per_sec"] = round(s["train_images_per_sec"], 1)
        result[f"world_{nproc}_test_acc"] = round(s["test_acc"], 4)
    result["ratio_world2_over_world1"] = round(result["world_2_images_per_sec"] / result["world_1_images_per_sec"], 3)
    return result


def main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m distcls.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", choices=["checkpoint", "throughput", "all"], default="all")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each save")
    p.add_argument("--out", help="also write the JSON result to this file")
    args = p.parse_args(argv)
    result = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="distcls-bench-") as tmp:
        if args.what in ("checkpoint", "all"):
            result["checkpoint"] = bench_checkpoint(Path(tmp), args.repeats)
        if args.what in ("throughput", "all"):
            result["throughput"] = bench_throughput(Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from distcls.io import atomic_write_text
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    exit_with(main)
