"""The CUDA paths that CPU tests cannot reach: `python -m pytest -m gpu tests` on a GPU
machine, or `python -m distcls.bench gpu` (docs/gpu-check.md), which runs them first.

Each test is parametrized by device. The `cuda` variants carry the `gpu` marker and are skipped,
with the reason, where torch sees no CUDA device (so CI, on CPUs, never runs them); the `cpu`
variants run in the ordinary suite wherever they mean something, so the logic the GPU will run
is exercised on every commit. Tolerances are stated where they are used:

- mixed precision: the update of 3 SGD steps under bf16 / fp16 (with the loss scaler and gradient
  clipping) against the same steps in float32 (TF32 off), as the relative error of the weight
  change, ||dW_amp - dW_fp32|| / ||dW_fp32||: at most AMP_TOLERANCE[amp] (bf16 carries 8 mantissa
  bits, fp16 11; clipping the scaled instead of the unscaled gradients would be off by ~100%).
- JPEG decoding: nvJPEG against libjpeg-turbo, uint8 pixels: mean absolute difference at most
  DECODE_MEAN_TOLERANCE levels and the 99th percentile at most DECODE_P99_TOLERANCE (IDCT and
  chroma upsampling may round differently; a crop from another box differs by tens of levels on
  average, which the test checks too). On the CPU both paths are the same decoder: bitwise.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn as nn

from conftest import FAST, assert_ok, load_ckpt, max_weight_diff, run_distcls, run_in_process, train_in_process
from distcls import config
from distcls.bench.compare import host_syncs
from distcls.config import AugmentConfig
from distcls.data import SplitView, TensorSource, train_loader
from distcls.data.transforms.augment import Preprocess
from distcls.engine import Precision, Progress, Trainer, backends, build_optimizer, build_scheduler

# cuBLAS reads its workspace setting when it starts; the deterministic resume test needs the fixed
# one (backends.configure sets it for a run's own process, which here is this one, started earlier)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
CUDA = torch.cuda.is_available()
GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not CUDA,
        reason="needs a CUDA GPU (torch.cuda.is_available() is False): "
        "run `python -m pytest -m gpu tests` on a GPU machine, see docs/gpu-check.md",
    ),
]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU)]
DEVICES_SLOW_ON_CPU = [
    pytest.param("cpu", id="cpu", marks=pytest.mark.slow),
    pytest.param("cuda", id="cuda", marks=GPU),
]

AMP_TOLERANCE = {"bf16": 0.05, "fp16": 0.02}  # measured on the CPU: 0.018, 0.005
DECODE_MEAN_TOLERANCE, DECODE_P99_TOLERANCE = 2.0, 12


@pytest.fixture(autouse=True)
def _restore_torch_switches():
    """Runs and `backends.configure` set process-wide switches: give the next test torch's own."""
    deterministic, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    benchmark = torch.backends.cudnn.benchmark
    conv = getattr(torch.backends.cudnn, "conv", None)
    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision")
    tf32 = (torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision) if new_api else None
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark
    if new_api:
        torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision = tf32


def test_the_gpu_variants_are_skipped_with_the_reason_without_cuda(request):
    """The marker wiring itself (runs everywhere): each cuda variant has the `gpu` marker, and a skip
    that names what it needs when torch sees no GPU."""
    cuda = DEVICES[1]
    names = {m.name for m in cuda.marks}
    assert names == {"gpu", "skipif"}
    skip = next(m for m in cuda.marks if m.name == "skipif")
    assert skip.args == (not CUDA,) and "pytest -m gpu" in skip.kwargs["reason"]
    assert any(m.startswith("gpu:") for m in request.config.getini("markers"))  # registered: -m gpu selects, no warning


# ----------------------------------------------------------------------------- a small trainer on any device

def _net(channels: int = 3, size: int = 16, classes: int = 10, batch_norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), norm(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), norm(32), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * (size // 2) ** 2, classes))


class NaNOnCalls(nn.Module):
    """`net` whose training output is NaN on chosen (1-based) calls."""

    def __init__(self, net: nn.Module, nan_calls=()):
        super().__init__()
        self.net, self.nan_calls, self.calls = net, set(nan_calls), 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls in self.nan_calls:
                out = out * float("nan")
        return out


def _trainer(
    device: str, model: nn.Module, overrides=(), steps: int = 4, batch: int = 32, size: int = 16, flag_lag=None
):
    """Trainer + loader on `device` over random uint8 images (crop + flip augmentation on the device)."""
    device = torch.device(device)
    cfg = config.load(None, ["optim.lr=0.1", *overrides])
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.optim, steps, 1)
    n = batch * steps
    g = torch.Generator().manual_seed(1)
    source = TensorSource(
        torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )
    loader = train_loader(SplitView(source, torch.arange(n)), batch, 1, 0, 0, device)
    preprocess = Preprocess(3, size, (0.5,) * 3, (0.25,) * 3, AugmentConfig(crop_padding=2, hflip=True), 0, num_keys=n)
    trainer = Trainer(
        model, model, optimizer, scheduler, Precision(cfg.train.amp, device), cfg.train, preprocess, device, flag_lag
    )
    return trainer, loader


def _params(model: nn.Module) -> list:
    return [p.detach().double().cpu().clone() for p in model.parameters()]


def _optimizer_state(optimizer) -> list:
    return [(k, v.detach().cpu().clone() if torch.is_tensor(v) else v)
            for group in optimizer.param_groups for p in group["params"] for k, v in sorted(optimizer.state[p].items())]


def _relative_change_error(start: list, got: list, want: list) -> float:
    """||(got - start) - (want - start)|| / ||want - start|| over all parameters."""
    num = sum(((g - w) ** 2).sum() for g, w in zip(got, want)) ** 0.5
    den = sum(((w - s) ** 2).sum() for s, w in zip(start, want)) ** 0.5
    return float(num / den)


def _train_epoch(device, overrides=(), steps=3) -> tuple[list, list, Trainer]:
    model = _net()
    trainer, loader = _trainer(device, model, overrides, steps=steps)
    start = _params(model)
    progress = Progress(trainer.device)
    for _ in trainer.train_epoch(loader, progress):
        pass
    assert progress.global_step == steps and progress.skipped_steps == 0
    return start, _params(model), trainer


# ----------------------------------------------------------------------------- 1. mixed precision against float32

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps_match_float32_within_the_stated_tolerance(device, amp):
    """bf16, and fp16 with the loss scaler and gradient clipping (unscaled before clipping): the
    update of 3 steps equals float32's to AMP_TOLERANCE[amp]."""
    backends.configure(False, False, False, torch.device(device))  # the float32 reference in full float32 (no TF32)
    clip = ["train.clip_grad_norm=0.5"] if amp == "fp16" else []
    start, ref, _ = _train_epoch(device, clip)
    start_amp, got, trainer = _train_epoch(device, [f"train.amp={amp}", *clip])
    assert all(torch.equal(a, b) for a, b in zip(start, start_amp))
    error = _relative_change_error(start, got, ref)
    scale = trainer.precision.scaler.get_scale() if trainer.precision.scaler else None
    assert error <= AMP_TOLERANCE[amp], (
        f"{amp} update differs from float32's by {error:.4f} (relative); fp16 loss scale {scale}"
    )
    if amp == "fp16":
        assert scale == 2.0 ** 16  # no overflow: every one of the 3 steps was applied, none dropped by the scaler
        _, unclipped, _ = _train_epoch(device)  # the clipping mattered: without it the update is far off
        assert _relative_change_error(start, unclipped, ref) > 10 * AMP_TOLERANCE[amp]


# ----------------------------------------------------------------------------- 2. the guarded skip on the device

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optim,amp", [("sgd", "none"), ("adamw", "none"), ("sgd", "bf16")])
def test_a_skipped_step_on_the_device_leaves_weights_and_optimizer_state_unchanged(device, optim, amp):
    """train.nonfinite=skip: the NaN step's update is dropped inside the fused optimizer kernel
    (found_inf) with no host read; the steps around it train."""
    model = NaNOnCalls(_net(batch_norm=False), nan_calls={3})
    trainer, loader = _trainer(
        device, model, [f"optim.name={optim}", f"train.amp={amp}", "train.nonfinite=skip"], steps=5
    )
    from distcls.engine.precision import supports_device_skip

    assert supports_device_skip(trainer.optimizer)  # the fused kernel: no host read per step
    progress = Progress(trainer.device)
    steps = trainer.train_epoch(loader, progress)
    for _ in range(2):
        next(steps)
    weights, state = _params(model), _optimizer_state(trainer.optimizer)
    next(steps)  # step 3: NaN loss
    assert all(torch.equal(a, b) for a, b in zip(weights, _params(model)))
    after = _optimizer_state(trainer.optimizer)
    assert [k for k, _ in after] == [k for k, _ in state]
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for (_, a), (_, b) in zip(state, after))
    for _ in steps:
        pass
    assert progress.skipped_steps == 1 and progress.global_step == 5
    assert not all(torch.equal(a, b) for a, b in zip(weights, _params(model)))  # steps 4 and 5 trained
    assert all(torch.isfinite(p).all() for p in _params(model))


# ----------------------------------------------------------------------------- 3. no host sync in a steady-state step

def _count_host_syncs(device: str, steps: int = 5) -> tuple[dict, int, list]:
    """torch.profiler over `steps` steady-state steps with flag_lag=1: (host syncs other than the
    flag read's event wait, those event waits, [(step being read, newest queued step)])."""
    from torch.profiler import ProfilerActivity, profile

    model = NaNOnCalls(_net())
    trainer, loader = _trainer(device, model, steps=steps + 3, flag_lag=1)
    progress, reads = Progress(trainer.device), []
    read_flags = trainer._read_flags

    def recording(flags, progress):
        reads.append((flags.step, progress.epoch_step))
        return read_flags(flags, progress)

    trainer._read_flags = recording
    it = trainer.train_epoch(loader, progress)
    next(it), next(it)  # warm-up: first-use allocations, cuDNN/cuBLAS handles
    reads.clear()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            next(it)
    names = {e.name for e in prof.events()}
    assert "aten::_fused_sgd_" in names and "aten::convolution" in names  # the profile saw the steps
    syncs = host_syncs(prof.events())
    return syncs, syncs.pop("cudaEventSynchronize", 0), reads


@pytest.mark.parametrize("device", DEVICES)
def test_a_steady_state_step_makes_no_host_sync_but_the_one_step_late_flag_read(device):
    syncs, event_waits, reads = _count_host_syncs(device, steps=5)
    assert syncs == {}, f"host syncs in 5 steady-state steps: {syncs}"
    # the only wait: one per step, on the PREVIOUS step's flags (the device has its next step queued)
    assert len(reads) == 5 and all(read < newest for read, newest in reads), reads
    assert event_waits <= 5 if device == "cuda" else event_waits == 0


# ----------------------------------------------------------------------------- 4. GPU JPEG decoding

def _jpeg_source(tmp_path, n: int = 8):
    from distcls.bench.imagefolder import write_jpegs
    from distcls.data import build_data

    root = write_jpegs(tmp_path / "jpegs", n, 2)
    cfg = config.load(None, ["data.name=imagefolder", f"data.root={root}", "data.image_size=64", "data.val_fraction=0",
                             "data.split=[0.75, 0, 0.25]", "data.augment.random_resized_crop=true"])
    return build_data(cfg).splits.train


def _pixel_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.cpu().int() - b.cpu().int()).abs().double().flatten()
    return float(d.mean()), float(d.quantile(0.99)) if d.numel() <= 16_000_000 else float(d.max())


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_decode_decodes_the_cpu_decoders_pixels_and_cuts_the_same_keyed_crops(tmp_path, device):
    """data.gpu_decode's batch assembly (the training-process side) against the CPU workers' path,
    sample by sample: same keys, labels and crop boxes; pixels within the stated tolerance."""
    from distcls.data.transforms import gpu_decode
    from distcls.data.transforms.images import read_image

    view = _jpeg_source(tmp_path)
    source, indices, dev = view.source, [int(i) for i in view.indices], torch.device(device)
    seed, epoch = 3, 2
    # full images: nvJPEG (or the CPU batch decoder) against read_image
    for i in indices[:3]:
        path = source.samples[i][0]
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        full = gpu_decode.decode_jpeg(data, mode=gpu_decode.ImageReadMode.RGB, device=dev)
        ref = read_image(path, 3)
        assert full.shape == ref.shape
        mean, p99 = _pixel_difference(full, ref)
        assert mean <= DECODE_MEAN_TOLERANCE and p99 <= DECODE_P99_TOLERANCE, (path, mean, p99)
        if device == "cpu":
            assert torch.equal(full, ref)
    # training crops: the batch as gpu_decode assembles it against each sample as the workers load it
    items = [gpu_decode.read_item(source, i, True, seed, epoch) for i in indices]
    assert {it[0] for it in items} == {"jpeg"}
    images, labels, keys, bad = gpu_decode.assemble(items, source, True, seed, epoch, dev)
    assert bad == [] and images.device.type == dev.type and images.dtype == torch.uint8
    loaded = [source.load(i, True, seed, epoch) for i in indices]
    assert keys.tolist() == indices and labels.tolist() == [label for _, label, _, _ in loaded]
    want = torch.stack([img for img, _, _, _ in loaded])
    mean, p99 = _pixel_difference(images, want)
    assert mean <= DECODE_MEAN_TOLERANCE and p99 <= DECODE_P99_TOLERANCE, (mean, p99)
    if device == "cpu":
        assert torch.equal(images.cpu(), want)
    # the check can fail: another epoch's crop boxes are far outside the tolerance
    other = torch.stack([source.load(i, True, seed, epoch + 1)[0] for i in indices])
    assert _pixel_difference(other, want)[0] > 4 * DECODE_MEAN_TOLERANCE


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=GPU[1].kwargs["reason"])
def test_gpu_decode_loader_yields_the_cpu_loaders_batches(tmp_path):
    """The whole loader (workers read bytes, the training process decodes): batch by batch the same
    samples, labels and crops as data.gpu_decode=false, pixels within the tolerance."""
    view = _jpeg_source(tmp_path, n=24)
    dev = torch.device("cuda")
    batches = {}
    for gpu in (False, True):
        loader = train_loader(view, 8, 1, 0, 5, dev, num_workers=2, gpu_decode=gpu)
        loader.sampler.set_epoch(1)
        batches[gpu] = [(b.images, b.labels.tolist(), b.keys.tolist()) for b in loader]
    assert len(batches[True]) == len(batches[False]) == len(view) // 8 > 0
    for (img_g, lab_g, key_g), (img_c, lab_c, key_c) in zip(batches[True], batches[False]):
        assert key_g == key_c and lab_g == lab_c
        mean, p99 = _pixel_difference(img_g, img_c)
        assert mean <= DECODE_MEAN_TOLERANCE and p99 <= DECODE_P99_TOLERANCE, (mean, p99)


# in-memory CIFAR-shaped runs of the last three sections (tf32 last: GROUP_RUN leaves it out)
SYN = ["data.name=synthetic", "data.synthetic.size=16", "data.synthetic.channels=3", "data.synthetic.train_samples=192",
       "data.synthetic.test_samples=32", "data.val_fraction=0", "model.name=cnn3", "model.args.batch_norm=true",
       "train.epochs=1", "train.max_steps_per_epoch=3", "optim.lr=0.1", "train.tf32=false"]


# ----------------------------------------------------------------------------- 5. a 1-rank process group

GROUP_RUN = [*SYN[:-1], "train.epochs=2", "train.max_steps_per_epoch=3", "checkpoint.every_steps=2"]


@pytest.mark.parametrize(
    "device,backend",
    [pytest.param("cpu", "gloo", id="cpu-gloo"), pytest.param("cuda", "nccl", id="cuda-nccl", marks=GPU)],
)
def test_a_one_rank_process_group_trains_and_checkpoints_through_ddp(tmp_path, monkeypatch, device, backend):
    """distcls forms no process group at world size 1 (`torchrun --nproc_per_node=1` is one plain
    process: the test below), so this test forms a real 1-rank group itself and has the run treat
    world size 1 as distributed: DDP's gradient all-reduce (and on CUDA SyncBatchNorm), the step's
    flag all-reduce, the agreed sums, BatchNorm averaging and the epoch-end agreement all go
    through `backend`. It trains, saves mid-epoch and epoch checkpoints, resumes, and reaches the
    plain single process's weights."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from distcls.runtime.dist import DistEnv

    args = [f"dist.device={device}", *GROUP_RUN]
    train_in_process(tmp_path / "plain", *args)
    wrapped = []

    class RecordingDDP(DistributedDataParallel):
        def __init__(self, module, *a, **kw):
            super().__init__(module, *a, **kw)
            wrapped.append(self)

    monkeypatch.setattr(DistEnv, "distributed", property(lambda self: True))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", RecordingDDP)
    kwargs = {"device_id": torch.device("cuda", 0)} if backend == "nccl" else {}
    tdist.init_process_group(backend, store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1, **kwargs)
    try:
        group = [*args, f"dist.backend={backend}", *(["train.sync_bn=true"] if device == "cuda" else [])]
        summary = train_in_process(tmp_path / "group", *group)
        ck = load_ckpt(tmp_path / "group/checkpoints/last.pt")
        resumed = train_in_process(tmp_path / "group", *group, "train.epochs=3", resume="auto")
    finally:
        tdist.destroy_process_group()
    assert len(wrapped) == 2  # one DDP model per run (the run, the resumed one)
    assert summary["epochs_completed"] == 2 and summary["world_size"] == 1
    assert resumed["epochs_completed"] == 3 and resumed["resumed_from"]["epoch"] == 2
    ref = load_ckpt(tmp_path / "plain/checkpoints/last.pt")
    assert ck["step"] == 6 and not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert (tmp_path / "group/checkpoints/epoch_0001.pt").exists()
    tolerance = 1e-4 if device == "cuda" else 1e-6  # cuda: SyncBatchNorm's own kernels against BatchNorm's
    assert max_weight_diff(ck["model"], ref["model"]) <= tolerance


@pytest.mark.parametrize("device", DEVICES_SLOW_ON_CPU)
def test_torchrun_with_one_process_trains_checkpoints_and_resumes_on_the_device(tmp_path, device):
    out = tmp_path / "run"
    visible = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES") or "0"} if device == "cuda" else None
    common = [f"run.out_dir={out}", *FAST, "train.max_steps_per_epoch=4", f"dist.device={device}", "log.console=plain"]
    proc = run_distcls(
        "train",
        [*common, "train.epochs=2", "checkpoint.every_steps=3"],
        torchrun_args=["--max-restarts=0"],
        env=visible,
        timeout=240,
    )
    assert_ok(proc)
    # world size 1: one plain process
    assert f"(torchrun, {device}, no process group)" in proc.stdout, proc.stdout[-2000:]
    ck = load_ckpt(out / "checkpoints/last.pt")
    assert (ck["epoch"], ck["step"], ck["world_size"]) == (2, 8, 1)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    resumed = run_distcls("train", [*common, "train.epochs=3", "--resume", "auto"], torchrun_args=["--max-restarts=0"],
                          env=visible, timeout=240)
    assert_ok(resumed)
    assert load_ckpt(out / "checkpoints/last.pt")["step"] == 12


# ----------------------------------------------------------------------------- 6. exact resume, deterministic

class StoppingNet(nn.Module):
    """A conv + BatchNorm net (no op without a deterministic CUDA kernel) that sends its own process
    SIGTERM in training call `stop_at` (0: never), as a scheduler's preemption would."""

    def __init__(self, spec, stop_at: int):
        super().__init__()
        self.net = _net(spec.channels, spec.image_size, spec.num_classes)
        self.stop_at, self.calls = stop_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return self.net(x)


def stopping_net(spec, cfg, stop_at: int = 0):
    """model.name=test_gpu:stopping_net"""
    return StoppingNet(spec, stop_at)


@pytest.mark.parametrize(
    "device,amp",
    [
        pytest.param("cpu", "none", id="cpu-none"),
        pytest.param("cpu", "bf16", id="cpu-bf16", marks=pytest.mark.slow),
        pytest.param("cuda", "none", id="cuda-none", marks=GPU),
        pytest.param("cuda", "bf16", id="cuda-bf16", marks=GPU),
    ],
)
def test_deterministic_mid_epoch_resume_is_bitwise(tmp_path, device, amp):
    """run.deterministic=true: stopped mid-epoch by SIGTERM and resumed equals never stopped, in
    every tensor (world size 1). A second uninterrupted run is the control: if it differs too, the
    kernels are not deterministic and the message says so."""
    from distcls.run.runner import Stopped

    args = [f"dist.device={device}", "model.name=test_gpu:stopping_net", "run.deterministic=true", f"train.amp={amp}",
            "train.epochs=2", "train.max_steps_per_epoch=6", "data.augment.crop_padding=1", "data.augment.hflip=true",
            "data.max_eval_samples=32"]
    train_in_process(tmp_path / "ref", *args)
    stopped = run_in_process(tmp_path / "run", *args, "model.args.stop_at=4")
    assert isinstance(stopped, Stopped) and load_ckpt(tmp_path / "run/checkpoints/last.pt")["epoch_step"] == (
        4 if device == "cpu" else 5
    )
    train_in_process(tmp_path / "run", *args, resume="auto")
    ref, got = load_ckpt(tmp_path / "ref/checkpoints/last.pt"), load_ckpt(tmp_path / "run/checkpoints/last.pt")
    equal = ref["model"].keys() == got["model"].keys() and all(
        torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"]
    )
    if not equal:
        train_in_process(tmp_path / "control", *args)
        control = load_ckpt(tmp_path / "control/checkpoints/last.pt")["model"]
        same_twice = all(torch.equal(ref["model"][k], control[k]) for k in control)
        pytest.fail(
            "resumed weights differ from the uninterrupted run's by "
            f"{max_weight_diff(ref['model'], got['model']):.3e}; "
            + (
                "two uninterrupted runs are bitwise equal, so the resume loses state"
                if same_twice
                else f"two uninterrupted runs differ too ({max_weight_diff(ref['model'], control):.3e}): kernels not "
                     "deterministic"
            )
        )
    for index, state in ref["optimizer"]["state"].items():
        assert all(
            torch.equal(v, got["optimizer"]["state"][index][k]) for k, v in state.items() if torch.is_tensor(v)
        ), index


# ----------------------------------------------------------------------------- 7. channels_last and compile (last:
# compiling is the slowest)

@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU)])
@pytest.mark.parametrize("channels_last,compile", [
    # one compile: each costs ~20-40 s on the GPU machine
    (True, False), pytest.param(True, True, marks=pytest.mark.slow)])
def test_channels_last_and_compile_train_the_same_steps(tmp_path, device, channels_last, compile):
    """A run with train.channels_last / train.compile trains, saves plain weights (channels_last
    strides kept, no _orig_mod. prefix) and reaches eager contiguous float32's weights to 1e-3
    of the update. (Compile on the CPU takes minutes on a small machine: slow there.)"""
    args = [f"dist.device={device}", *SYN]
    train_in_process(tmp_path / "ref", *args)
    summary = train_in_process(tmp_path / "run", *args, f"train.channels_last={str(channels_last).lower()}",
                               f"train.compile={str(compile).lower()}")
    assert summary["epochs_completed"] == 1 and summary["global_step"] == 3
    ref, got = (
        load_ckpt(tmp_path / "ref/checkpoints/last.pt")["model"],
        load_ckpt(tmp_path / "run/checkpoints/last.pt")["model"],
    )
    assert ref.keys() == got.keys() and not any(k.startswith(("module.", "_orig_mod.")) for k in got)
    convs = [k for k, v in got.items() if v.dim() == 4]
    assert convs and all(got[k].is_contiguous(memory_format=torch.channels_last) == channels_last for k in convs)
    from distcls.data import build_data
    from distcls.models import build_model
    from distcls.run.components import seed_everything

    cfg = config.load(None, args)
    seed_everything(cfg.run.seed)  # as the run: seed, data, then the model
    init = build_model(cfg.model, build_data(cfg).spec).state_dict()
    weights = [k for k in got if got[k].is_floating_point() and "running" not in k]
    error = _relative_change_error(
        [init[k].double() for k in weights], [got[k].double() for k in weights], [ref[k].double() for k in weights]
    )
    assert error <= 1e-3, f"the update differs from eager contiguous float32's by {error:.2e} (relative)"
