"""`python -m distcls.bench MODE`: every mode runs on a tiny config and writes well-formed JSON.

Benchmarks are not tests: no timing is a pass/fail condition here. What is checked is that each
mode runs, that its JSON holds every figure it promises (finite, positive, one per round), that
the headline ratios are what the per-round figures say, and that start-up stays lazy.
"""
import contextlib
import importlib
import io
import json
import math
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, assert_ok, child_env
from distcls.bench.__main__ import MODES, main
from distcls.cli import run_cli

TINY = ["data.batch_size=32", "data.val_fraction=0"]
# whole runs of `python -m distcls.train` kept short: 10 steps per epoch (cnn2 on digits: ~0.5 test accuracy
# after two epochs, far from chance, so equal accuracies at world size 1 and 2 still say equal weights), no plots
SHORT_RUN = [*TINY, "train.max_steps_per_epoch=10", "log.plots=false"]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _bench(tmp_path, *argv) -> dict:
    out = tmp_path / "bench.json"
    assert run_cli(main, [*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _run_here(cmd: list) -> int:
    """A bench's single-process child, `python -m MODULE ARGS`, run in this process instead (its exit
    code): the same module's main on the same arguments, on one thread like the child (tests/conftest.py),
    its console output dropped as the bench drops the child's. What crosses a process boundary
    (torchrun's ranks, a SIGTERM) stays a real process in every bench test."""
    assert cmd[:2] == [sys.executable, "-m"] and cmd[2] != "torch.distributed.run", cmd
    module = importlib.import_module(cmd[2])
    with contextlib.redirect_stdout(io.StringIO()):
        return run_cli(module.main, cmd[3:])


@pytest.fixture
def single_process_runs_here(monkeypatch):
    """Every single-process `python -m distcls.train` / `distcls.bench.ddp_loop` a bench starts runs in
    this process (no interpreter start-up); multi-process runs stay torchrun. Returns the commands run here."""
    from distcls.bench import checkpoint, common, scaling, throughput

    here = []

    def run_train(args, nproc: int = 1) -> None:
        if nproc > 1:
            return common.run_train(args, nproc)
        here.append(common.train_cmd(args))
        assert _run_here(here[-1]) == 0, here[-1]

    def run_cmd(cmd: list) -> float:
        if "torch.distributed.run" in cmd:
            return real_run_cmd(cmd)
        here.append(cmd)
        t = time.perf_counter()
        assert _run_here(cmd) == 0, cmd
        return time.perf_counter() - t

    real_run_cmd = scaling.run_quiet
    for module in (checkpoint, throughput):
        monkeypatch.setattr(module, "run_train", run_train)
    monkeypatch.setattr(scaling, "run_quiet", run_cmd)
    return here


def test_every_mode_module_has_the_mode_interface():
    for name, module in MODES.items():
        assert callable(module.add_arguments) and callable(module.run), name


def test_compare_writes_every_figure_and_ratio(tmp_path, capsys):
    r = _bench(
        tmp_path, "compare", "--steps", "2", "--warmup", "1", "--rounds", "2", "--workers", "0", "--threads", "1",
        "--profile", "3", *TINY, "data.augment.crop_padding=1", "data.augment.hflip=true", "train.ema.enabled=true",
        "train.ema.every_steps=1",
    )
    assert r["mode"] == "compare" and r["setup"]["batch_size"] == 32 and r["setup"]["augment"]["crop_padding"] == 1
    for k in "abc":
        assert len(r["images_per_sec"][k]) == 2 and all(map(_positive, r["images_per_sec"][k])), k
    assert _positive(r["flops_per_image"]) and _positive(r["matmul_peak"]["flops_per_s"])
    assert r["median_images_per_sec"]["d"] == pytest.approx(
        r["matmul_peak"]["flops_per_s"] / r["flops_per_image"], rel=1e-3
    )
    for k in ("a/b", "a/c"):
        assert r["ratios"][k] == pytest.approx(statistics.median(r["per_round_ratios"][k]), abs=2e-3)
    assert _positive(r["ratios"]["a/d"])  # (below 1 in every run: a ratio of two timings, so no threshold here)
    assert r["profile"]["a"]["steps"] == 3 and "aten::" in r["profile"]["a"]["table"]
    assert r["profile"]["a"]["host_syncs"] == {}  # distcls's step reads nothing from the device, its EMA update neither
    assert r["ema"]["every_steps"] == 1 and _positive(r["ema"]["update_ms"]) and _positive(r["ema"]["update_over_step"])
    printed = capsys.readouterr().out
    assert "a/b" in printed and "hand-written loop" in printed  # the table, not only the file
    assert "host-sync calls: none" in printed and "model EMA:" in printed


def test_compare_flops_per_image_match_the_counted_convolutions():
    from distcls import config
    from distcls.bench.compare import flops_per_image
    from distcls.spec import DataSpec
    from distcls.models import build_model

    cfg = config.load(None, ["model.name=lenet"])
    model = build_model(cfg.model, DataSpec(3, 10, 32))
    # LeNet forward: conv1 6x28x28x(3*25) + conv2 16x10x10x(6*25) + fc 400*120 + 120*84 + 84*10 MACs; backward = 2x
    # forward (the first layer's input needs no gradient: its backward is one product, not two)
    conv1 = 6 * 28 * 28 * 3 * 25
    forward = conv1 + 16 * 10 * 10 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10
    assert flops_per_image(model, cfg, DataSpec(3, 10, 32), torch.device("cpu"), 4) == 2 * (3 * forward - conv1)


def test_compare_refuses_what_it_cannot_measure(capsys):
    assert run_cli(main, ["compare", "--rounds", "0"]) == 2
    assert run_cli(main, ["compare", "train.accum_steps=2"]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 2 and all(l.startswith("distcls: error: ") for l in lines)
    assert "--rounds" in lines[0] and "accum_steps" in lines[1]


def test_handwritten_crop_is_a_window_of_the_padded_image_and_flip_mirrors():
    from distcls.bench.handwritten import augment

    x = torch.rand(16, 3, 6, 6)
    out = augment(x, 2, False, 0.0)
    padded = F.pad(x, (2, 2, 2, 2))
    for b in range(16):
        assert any(torch.equal(out[b], padded[b, :, oy:oy + 6, ox:ox + 6]) for oy in range(5) for ox in range(5))
    flipped = augment(x, 0, True, 0.0)
    assert all(torch.equal(flipped[b], x[b]) or torch.equal(flipped[b], x[b].flip(-1)) for b in range(16))
    assert not torch.equal(flipped, x) and not torch.equal(flipped, x.flip(-1))  # 2^-15 chance of all-equal flips


def test_import_distcls_train_loads_nothing_heavy():
    code = ("import sys, distcls.train; heavy = ('torchvision', 'wandb', 'matplotlib', 'sklearn', 'torch._dynamo');"
            "print(' '.join(m for m in heavy if m in sys.modules))")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert_ok(proc)
    assert proc.stdout.split() == []


def test_digits_read_from_the_bundled_csv_equal_scikit_learns_load_digits():
    from sklearn.datasets import load_digits

    from distcls.data.datasets.digits import _digits_arrays

    images, labels = _digits_arrays()
    ref = load_digits()
    assert (images == ref.images).all() and (labels == ref.target).all()


@pytest.mark.slow
def test_startup_writes_import_and_first_step_times(tmp_path):
    r = _bench(tmp_path, "startup", "--repeats", "1", "--case", "cnn2, digits", "log.plots=false")
    assert r["overrides"] == ["log.plots=false"] and list(r["command_to_first_step_s"]) == ["cnn2, digits"]
    assert set(r["import_s"]) == {"python (no import)", "torch", "distcls.train"}
    assert all(_positive(v) for k, v in r["import_s"].items() if k != "python (no import)")
    first, exit_s = r["command_to_first_step_s"]["cnn2, digits"], r["command_to_exit_s"]["cnn2, digits"]
    assert _positive(first) and first <= exit_s
    assert r["heavy_modules_loaded_by_import_distcls_train"] == []


@pytest.mark.slow
def test_scaling_runs_world_size_1_and_2_beside_the_hand_written_ddp_loop(tmp_path, single_process_runs_here):
    r = _bench(tmp_path, "scaling", "--epochs", "2", "--rounds", "1", "model.name=cnn2", *SHORT_RUN)
    # world size 1 here, 2 torchrun
    assert [cmd[2] for cmd in single_process_runs_here] == ["distcls.train", "distcls.bench.ddp_loop"]
    for k in ("distcls_w1", "distcls_w2", "hand_w1", "hand_w2"):
        assert len(r["images_per_sec"][k]) == 1 and _positive(r["images_per_sec"][k][0]), k
    assert r["ratios"]["distcls_w2/w1"] == pytest.approx(
        r["images_per_sec"]["distcls_w2"][0] / r["images_per_sec"]["distcls_w1"][0], abs=2e-3
    )
    assert r["distcls_test_acc"]["distcls_w1"] == r["distcls_test_acc"]["distcls_w2"]  # world-size invariant training
    assert 0.2 < r["distcls_test_acc"]["distcls_w1"][0] <= 1  # trained past chance: the equality says equal weights


@pytest.mark.slow
def test_throughput_cli_writes_json(tmp_path, capsys, single_process_runs_here):
    out = tmp_path / "t.json"
    assert run_cli(main, ["throughput", "--epochs", "2", "--out", str(out), "model.name=cnn2", *SHORT_RUN]) == 0
    assert len(single_process_runs_here) == 1  # world size 1 here, 2 under torchrun
    r = json.loads(out.read_text())
    assert (
        r == json.loads(capsys.readouterr().out)
        and _positive(r["world_1_images_per_sec"])
        and _positive(r["world_2_images_per_sec"])
    )
    assert r["ratio_world2_over_world1"] == pytest.approx(
        r["world_2_images_per_sec"] / r["world_1_images_per_sec"], abs=2e-3
    )
    # world-size invariant training (not at chance)
    assert r["world_1_test_acc"] == r["world_2_test_acc"] and 0.2 < r["world_1_test_acc"] <= 1


def _ratio_of_rounded(a: float, b: float, digits: int) -> tuple:
    """The range a/b can have when a and b were each rounded to `digits` decimals."""
    h = 0.5 * 10 ** -digits
    return (a - h) / (b + h), (a + h) / (b - h)


@pytest.mark.slow
def test_checkpoint_mode_writes_json(tmp_path, single_process_runs_here):
    """The whole mode on a tiny workload (cnn2, 192 samples, one off/on pair): the ResNet-18 save is the
    real one, the off/on epoch runs run in this process, the SIGTERM run is a real process."""
    r = _bench(tmp_path, "checkpoint", "--repeats", "2", "--samples", "192", "--model", "cnn2", "--rounds", "1")
    assert [[a for a in cmd if a.startswith("checkpoint.every_steps=")] for cmd in single_process_runs_here] == [
        ["checkpoint.every_steps=0"], ["checkpoint.every_steps=5"]]
    assert set(r) == {
        "mode",
        "machine",
        "setup",
        "resnet18_checkpoint_mb",
        "resnet18_save_s_median",
        "resnet18_save_s_all",
        "steps_per_epoch",
        "checkpoints_per_epoch",
        "epoch_s_no_step_checkpoints",
        "epoch_s_checkpoint_every_5_steps",
        "epoch_time_ratio_every_5_steps",
        "sigterm_to_exit_s",
        "sigterm_exit_code",
        "sigterm_saved_at",
    }
    assert r["setup"] == {"model": "cnn2", "samples": 192, "batch": 32, "rounds": 1, "save_repeats": 2}
    assert r["resnet18_checkpoint_mb"] > 40  # ResNet-18's 11.7 M parameters and momentum buffers in float32
    assert len(r["resnet18_save_s_all"]) == 2 and all(map(_positive, r["resnet18_save_s_all"]))
    assert r["resnet18_save_s_median"] == pytest.approx(statistics.median(r["resnet18_save_s_all"]), abs=1e-4)
    assert r["steps_per_epoch"] == 192 // 32 and r["checkpoints_per_epoch"] == 1  # a save after step 5 of 6
    off, on = r["epoch_s_no_step_checkpoints"], r["epoch_s_checkpoint_every_5_steps"]
    assert len(off) == len(on) == 1 and all(map(_positive, off + on))
    lo, hi = _ratio_of_rounded(on[0], off[0], 3)
    assert lo - 5e-4 <= r["epoch_time_ratio_every_5_steps"] <= hi + 5e-4
    assert _positive(r["sigterm_to_exit_s"]) and r["sigterm_exit_code"] == 3  # stopped by SIGTERM, checkpoint saved
    # after the 5 steps seen before the signal (mid-epoch or at an epoch's end, as timing has it)
    saved = r["sigterm_saved_at"]
    assert saved["step"] >= 5 and saved["step"] == saved["epoch"] * 6 + saved["epoch_step"], saved


def test_checkpoint_refuses_too_few_samples_for_a_mid_epoch_checkpoint(capsys):
    assert run_cli(main, ["checkpoint", "--samples", "160"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert (
        len(err) == 1 and err[0].startswith("distcls: error: --samples 160 gives 5 steps") and "--samples 192" in err[0]
    )


def test_imagefolder_writes_both_pipelines_rates(tmp_path):
    r = _bench(
        tmp_path, "imagefolder", "--images", "60", "--classes", "2", "--workers", "1", "--batch", "8", "--size", "32",
        "--repeats", "1", "--steps", "0",
    )
    assert r["images"] == 60 and r["workers"] == 1 and r["crop"] == 32
    rates = r["pipeline_images_per_sec"]
    assert {"distcls", "torchvision"} <= set(rates), rates
    assert "train_resnet18_images_per_sec" not in r  # --steps 0 skips the end-to-end measurement


def test_augment_writes_both_pipelines_rates(tmp_path):
    r = _bench(
        tmp_path, "augment", "--images", "16", "--size", "32", "--batch", "8", "--workers", "1", "--repeats", "1"
    )
    assert _positive(r["distcls_images_per_s"]) and _positive(r["torchvision_images_per_s"])
    assert r["per_core_ratio"] == pytest.approx(r["distcls_per_core"] / r["torchvision_per_core"])
    assert r["distcls_cores"] == 1 and r["torchvision_workers"] == 1

@pytest.mark.slow
def test_reference_runs_distcls_and_the_reference_loop_at_world_size_1_and_2(tmp_path):
    r = _bench(
        tmp_path, "reference", "--images", "64", "--size", "16", "--batch", "16", "--workers", "1", "--epochs", "2",
        "--rounds", "1", "--ema-steps", "1",
    )
    assert set(r["images_per_sec"]) == {"distcls_w1", "reference_w1", "distcls_w2", "reference_w2"}
    assert all(len(v) == 1 and _positive(v[0]) for v in r["images_per_sec"].values())
    for n in (1, 2):
        ratio = r["images_per_sec"][f"distcls_w{n}"][0] / r["images_per_sec"][f"reference_w{n}"][0]
        assert r["ratios"][f"w{n}"] == pytest.approx(ratio, abs=2e-3)


@pytest.mark.parametrize("args, message", [
    (["--nprocs", "1,3", "--batch", "128"], "--batch 128: each process's share must be even"),
    (["--nprocs", "two"], "--nprocs 'two': give world sizes such as 1,2"),
    (["--size", "0"], "--size 0: must be at least 8"),
    (["--epochs", "1"], "--epochs 1: must be at least 2"),
])
def test_reference_refuses_what_it_cannot_measure_before_writing_images(capsys, args, message):
    assert run_cli(main, ["reference", *args]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith(f"distcls: error: {message}"), err


# ----------------------------------------------------------------------------- gpu: the device check (gpu_check)

def test_gpu_check_smoke_lists_the_gpu_only_parts_as_skipped(tmp_path, capsys):
    """`bench gpu` without CUDA (here forced with --cpu-smoke): the GPU-only parts asked for are
    listed as skipped with the reason, one JSON, one table (the parts that run on the CPU are
    test_gpu_check_smoke_runs_end_to_end's)."""
    r = _bench(tmp_path, "gpu", "--cpu-smoke", "--parts", "compare:r18,compare:r50-compile")
    assert r["mode"] == "gpu" and r["smoke"] is True and not r["cuda"]
    assert [(p["name"], p["status"], p["reason"]) for p in r["parts"]] == [
        ("compare:r18", "skipped", "GPU only: no CUDA device"),
        ("compare:r50-compile", "skipped", "GPU only: no CUDA device"),
    ]
    printed = capsys.readouterr().out
    assert "GPU only: no CUDA device" in printed and "distcls GPU check" in printed


def test_gpu_check_skips_what_the_budget_cannot_hold_and_says_how_to_run_it(tmp_path, capsys):
    r = _bench(tmp_path, "gpu", "--cpu-smoke", "--budget-s", "1", "--parts", "tests,startup")
    assert [(p["name"], p["status"]) for p in r["parts"]] == [("tests", "skipped"), ("startup", "skipped")]
    assert all(p["reason"].startswith("out of budget") and f"--parts {p['name']}" in p["reason"] for p in r["parts"])
    assert run_cli(main, ["gpu", "--parts", "tests,bogus"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("distcls: error: --parts: unknown part(s) ['bogus']")


def test_gpu_check_reads_pytests_counts_and_failures(tmp_path):
    from distcls.bench.gpu_check import _pytest_counts

    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure message="assert 1 == 2"/></testcase>'
        '<testcase name="c"><skipped message="needs a CUDA GPU"/></testcase><testcase name="d"><error message="boom"/>'
        '</testcase></testsuite></testsuites>'
    )
    r = _pytest_counts(xml)
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 2, 1)
    assert r["failures"] == [{"test": "b", "message": "assert 1 == 2"}, {"test": "d", "message": "boom"}]
    assert r["skip_reasons"] == ["needs a CUDA GPU"]


@pytest.mark.slow
def test_gpu_check_smoke_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """The whole reduced plan: the GPU tests run and skip with their reason, compare, imagefolder
    and startup measure on the CPU, every GPU-only part is listed as skipped; one JSON, one table."""
    # the parts' processes, like every child of the suite (conftest.child_env)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the CPU smoke on a GPU host too: its child pytest skips the GPU tests
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    r = _bench(tmp_path, "gpu", "--cpu-smoke")
    assert r["mode"] == "gpu" and r["smoke"] is True and not r["cuda"]
    parts = {p["name"]: p for p in r["parts"]}
    assert list(parts)[:4] == ["tests", "compare:smoke", "imagefolder", "startup"]
    assert {n: p["status"] for n, p in parts.items() if not n.startswith("compare:r")} == {
        "tests": "ok", "compare:smoke": "ok", "imagefolder": "ok", "startup": "ok"}
    tests = parts["tests"]["result"]
    assert tests["passed"] == tests["failed"] == 0 and tests["skipped"] > 0
    assert any("needs a CUDA GPU" in reason for reason in tests["skip_reasons"])
    assert 0 < parts["compare:smoke"]["result"]["ratios"]["a/b"]
    train = parts["imagefolder"]["result"]["train_resnet18_images_per_sec"]
    assert set(train["ratio_over_synthetic"]) == {"distcls", "torchvision"} and _positive(train["synthetic"]["median"])
    startup = parts["startup"]
    first, exits = startup["result"]["command_to_first_step_s"], startup["result"]["command_to_exit_s"]
    assert len(exits) == 1 and _positive(exits[0]) and 0 < first[0] <= exits[0]
    assert "train.amp=bf16" in startup["command"] and "configs/fashion_mnist_cnn2.yaml" in " ".join(startup["command"])
    gpu_only = {n: p for n, p in parts.items() if n.startswith("compare:r")}
    assert len(gpu_only) == 8 and all(
        p["status"] == "skipped" and p["reason"] == "GPU only: no CUDA device" for p in gpu_only.values()
    )
    printed = capsys.readouterr().out
    assert "GPU only: no CUDA device" in printed and "distcls GPU check" in printed
