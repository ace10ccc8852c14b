"""The training step's seams, in process: the precision object (guarded update, state round trip),
the flags agreed per step (stop and non-finite, read at once or one step late) and the promise
that a steady-state step makes no host read of a device value."""
import pytest
import torch
import torch.nn as nn

from distcls import config
from distcls.bench.compare import host_syncs
from distcls.config import AugmentConfig, TrainConfig
from distcls.data import SplitView, TensorSource, train_loader
from distcls.data.transforms.augment import Preprocess
from distcls.engine import Precision, Progress, Trainer, build_optimizer, build_scheduler
from distcls.errors import TrainingDiverged
from distcls.runtime.signals import StopRequest

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _optimizer(model, name="sgd"):
    return build_optimizer(model, config.load(None, [f"optim.name={name}", "optim.lr=0.1"]).optim)


def _set_grads(model, value, precision=None):
    if precision is not None:  # a scaled backward first, as training does (the fp16 scaler starts there)
        precision.backward(model(torch.zeros(2, 1, 4, 4)).sum())
    for p in model.parameters():
        p.grad = torch.full_like(p, value)


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_a_skipped_update_leaves_weights_and_optimizer_state_untouched(name):
    model = _model()
    opt, precision = _optimizer(model, name), Precision("none", CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    def optimizer_state():
        return [(k, v.clone()) for p in model.parameters() for k, v in sorted(opt.state[p].items())]

    state_before = optimizer_state()
    _set_grads(model, 1.0)
    skipped = precision.step(opt, list(model.parameters()), None, skip=torch.tensor(True))
    assert bool(skipped)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # SGD's momentum buffers exist from the start (zeros) and are unchanged; Adam's state is created
    # by the (skipped) step: step 0 and zero moments, exactly a fresh optimizer's.
    state_after = optimizer_state()
    assert state_before == [] or [k for k, _ in state_after] == [k for k, _ in state_before]
    assert all(not v.any() for _, v in state_after) and len(state_after) >= len(list(model.parameters()))


def test_a_skipped_first_step_then_a_real_one_equals_the_real_one_alone():
    """torch's fused SGD allocates momentum buffers with empty_like on its first step; a skipped
    first step must not leave those uninitialized values for the next one."""
    runs = []
    for skip_first in (True, False):
        model = _model()
        opt, precision = _optimizer(model), Precision("none", CPU)
        if skip_first:
            _set_grads(model, float("nan"))
            # NaN grads: skipped
            assert bool(precision.step(opt, list(model.parameters()), None, skip=torch.tensor(False)))
        _set_grads(model, 0.5)
        assert not bool(precision.step(opt, list(model.parameters()), None, skip=torch.tensor(False)))
        _set_grads(model, 0.25)
        precision.step(opt, list(model.parameters()), None, skip=torch.tensor(False))
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_fp16_overflow_is_the_scalers_business_not_a_skipped_step():
    model = _model()
    opt, precision = _optimizer(model), Precision("fp16", CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _set_grads(model, float("inf"), precision)  # what an overflow of the scaled loss leaves
    skipped = precision.step(opt, list(model.parameters()), 1.0, skip=torch.tensor(False))
    assert not bool(skipped)  # not counted as a non-finite step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # but never applied
    assert precision.scaler.get_scale() == 2.0 ** 15  # the scale backs off from torch's initial 2**16


def test_precision_state_round_trip():
    model = _model()
    opt, precision = _optimizer(model), Precision("fp16", CPU)
    for g in (float("inf"), 1.0, 1.0):
        _set_grads(model, g, precision)
        precision.step(opt, list(model.parameters()), None, skip=torch.tensor(False))
    state = precision.state_dict()
    assert state["scale"] == 2.0 ** 15 and state["_growth_tracker"] == 2
    restored = Precision("fp16", CPU)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert Precision("bf16", CPU).state_dict() == {} and Precision("none", CPU).state_dict() == {}
    Precision("bf16", CPU).load_state_dict(state)  # an fp16 run resumed in bf16: nothing to restore, no error


# ----------------------------------------------------------------------------- the step loop

class NaNAt(nn.Module):
    """Linear classifier whose output is NaN on chosen (1-based) training calls."""

    def __init__(self, nan_calls=()):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        self.nan_calls, self.calls = set(nan_calls), 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls in self.nan_calls:
                out = out * float("nan")
        return out


class SignalAtCall(StopRequest):
    """A stop signal that arrives when the step checks for it the `n`-th time."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.calls = n, 0

    @property
    def requested(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def _trainer(model, nonfinite="skip", flag_lag=None, steps=6):
    opt = _optimizer(model)
    cfg = config.load(None, [])
    sched = build_scheduler(opt, cfg.sched, cfg.optim, steps_per_epoch=steps, epochs=1)
    src = TensorSource(torch.randint(0, 256, (16 * steps, 1, 4, 4), dtype=torch.uint8), torch.arange(16 * steps) % 4)
    loader = train_loader(SplitView(src, torch.arange(16 * steps)), 16, 1, 0, 0, CPU)
    pre = Preprocess(1, 4, (0.5,), (0.25,), AugmentConfig(crop_padding=1, hflip=True), 0, num_keys=16 * steps)
    return Trainer(
        model, model, opt, sched, Precision("none", CPU), TrainConfig(nonfinite=nonfinite), pre, CPU, flag_lag
    ), loader


@pytest.mark.parametrize("flag_lag", [0, 1])
@pytest.mark.parametrize("signal_step", [1, 2, 3])
def test_a_stop_signal_is_agreed_at_once_on_cpu_and_one_step_late_when_deferred(flag_lag, signal_step):
    trainer, loader = _trainer(NaNAt(), flag_lag=flag_lag)
    progress, signal = Progress(CPU, steps_per_epoch=loader.sampler.steps_per_epoch), SignalAtCall(signal_step)
    ends = [(progress.epoch_step, signal.agreed) for _ in trainer.train_epoch(loader, progress, signal)]
    assert ends[-1] == (signal_step + flag_lag, True) and not any(stop for _, stop in ends[:-1])


def test_with_a_lag_the_host_never_reads_the_step_it_just_queued():
    trainer, loader = _trainer(NaNAt(), flag_lag=1, steps=6)
    progress, read = Progress(CPU, steps_per_epoch=loader.sampler.steps_per_epoch), []
    read_flags = trainer._read_flags

    def recording(flags, progress):
        read.append((progress.epoch_step, flags.step))
        return read_flags(flags, progress)

    trainer._read_flags = recording
    for _ in trainer.train_epoch(loader, progress):
        pass
    # at step k the previous step's flags; at the epoch's last step its own too
    assert read == [(2, 1), (3, 2), (4, 3), (5, 4), (6, 5), (6, 6)]


@pytest.mark.parametrize("flag_lag", [0, 1])
def test_a_stop_in_the_epochs_last_step_is_agreed_at_that_step(flag_lag):
    trainer, loader = _trainer(NaNAt(), flag_lag=flag_lag, steps=4)
    progress, signal_in_step_4 = Progress(CPU, steps_per_epoch=loader.sampler.steps_per_epoch), SignalAtCall(4)
    ends = [signal_in_step_4.agreed for _ in trainer.train_epoch(loader, progress, signal_in_step_4)]
    assert ends == [False, False, False, True]


@pytest.mark.parametrize("flag_lag", [0, 1])
def test_nonfinite_skip_counts_and_never_reaches_the_weights(flag_lag):
    model = NaNAt(nan_calls={2, 5})
    trainer, loader = _trainer(model, flag_lag=flag_lag)
    progress = Progress(CPU, steps_per_epoch=loader.sampler.steps_per_epoch)
    for _ in trainer.train_epoch(loader, progress):
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert progress.skipped_steps == 2 and progress.global_step == 6
    assert progress.agree_sums().count == 4 * 16  # skipped steps add nothing to the running sums


@pytest.mark.parametrize("flag_lag", [0, 1])
def test_nonfinite_abort_names_the_step_and_stops_within_the_lag(flag_lag):
    model = NaNAt(nan_calls={3})
    trainer, loader = _trainer(model, nonfinite="abort", flag_lag=flag_lag)
    progress = Progress(CPU, steps_per_epoch=loader.sampler.steps_per_epoch)
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch 1, step 3"):
        for _ in trainer.train_epoch(loader, progress):
            pass
    assert progress.epoch_step == 3 + flag_lag
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_steady_state_step_reads_nothing_from_the_device():
    """No .item(), .tolist() of a device value, nonzero or synchronize between the first and the last step."""
    from torch.profiler import ProfilerActivity, profile

    trainer, loader = _trainer(NaNAt(), flag_lag=1, steps=8)
    progress = Progress(CPU, steps_per_epoch=loader.sampler.steps_per_epoch)
    steps = trainer.train_epoch(loader, progress)
    next(steps)  # warm-up step: first-use allocations
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            next(steps)
    assert progress.epoch_step == 6
    names = {e.name for e in prof.events()}
    assert "aten::addmm" in names and "aten::_fused_sgd_" in names  # the profile saw the steps
    assert host_syncs(prof.events()) == {}
    # The same profile around a host read finds it (the check can fail).
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        progress.skipped.item()
    assert host_syncs(prof.events())


def test_with_the_gpus_flag_lag_an_aborting_run_saves_nothing_after_its_diverged_step(tmp_path, monkeypatch):
    """On a GPU the host reads a step's flags one step late; a checkpoint due at the diverged step
    must not be written first (`--resume auto`, e.g. a torchrun restart, would go on past it as if
    the step had been skipped)."""
    from conftest import run_in_process
    from distcls.run import components

    class Lagging(Trainer):  # the CUDA default, on the CPU
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, flag_lag=1)

    monkeypatch.setattr(components, "Trainer", Lagging)
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch 1, step 4"):
        run_in_process(
            tmp_path / "run",
            "model.name=nan_model:build",
            "model.args.nan_steps=[4]",
            "train.nonfinite=abort",
            "checkpoint.every_steps=4",
            "train.epochs=1",
            "train.max_steps_per_epoch=10",
        )
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_one_ctrl_c_delivered_twice_is_one_request_and_a_later_one_interrupts():
    """A terminal and a wrapper (`timeout --foreground`) both forwarding one Ctrl-C: two SIGINTs
    microseconds apart were a second Ctrl-C (exit 130, the mid-epoch progress lost)."""
    import os
    import signal
    from distcls.errors import SecondInterrupt
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C again, at once
        assert stop.signal_name == "SIGINT"
        stop._first_sigint -= StopRequest.SAME_CTRL_C_S  # as if the first came a second ago
        with pytest.raises(SecondInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()
