"""Model EMA (engine/ema.py): the numbers against direct computations, its state, its schedule."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distcls.engine.ema import EMASchedule, ModelEMA, adjusted_decay


def toy(batchnorm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 4, 3),
        *([nn.BatchNorm2d(4)] if batchnorm else []),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ]
    return nn.Sequential(*layers)


def train_steps(model, steps, on_step):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        on_step(step)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_ema_equals_the_direct_formula_and_torchs_averaged_model(batchnorm):
    model, decay = toy(batchnorm), 0.9
    ema = ModelEMA(model, decay)
    torch_ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    reference = {}

    def on_step(step):
        ema.update(model)
        torch_ema.update_parameters(model)
        for name, value in model.state_dict().items():
            if not value.is_floating_point():
                reference[name] = value.clone()
            elif step == 1:
                reference[name] = value.clone()  # the first update copies
            else:
                reference[name] = decay * reference[name] + (1 - decay) * value

    train_steps(model, 6, on_step)
    got = ema.module.state_dict()
    assert got.keys() == reference.keys()
    for name, value in got.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6)
            assert torch.equal(value, torch_ema.module.state_dict()[name]), name  # torch's own EMA, bit for bit
        else:
            assert torch.equal(value, reference[name])  # num_batches_tracked follows the model
    assert ema.updates == 6 and int(ema.n_averaged) == 6
    if batchnorm:  # BatchNorm's running statistics are averaged, not copied
        assert not torch.equal(got["1.running_mean"], model.state_dict()["1.running_mean"])


def test_the_ema_is_not_the_model_and_gets_no_gradients():
    model = toy(True)
    ema = ModelEMA(model, 0.5)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ema.module.parameters(), model.parameters()))


def test_copy_updates_then_averaging():
    model = toy(False)
    ema = ModelEMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    ema.update(model, copy=True)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(4.0)
    ema.update(model, copy=True)
    assert all(torch.all(p == 4.0) for p in ema.module.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0)
    ema.update(model)
    assert all(torch.all(p == 2.0) for p in ema.module.parameters())


def test_state_round_trip_continues_bitwise():
    model = toy(True)
    ema = ModelEMA(model, 0.8)
    train_steps(model, 3, lambda step: ema.update(model))
    saved = copy.deepcopy(ema.state_dict())
    assert set(saved) == {"weights", "updates"} and saved["updates"] == 3
    assert not any(k.startswith("module.") for k in saved["weights"])  # a plain state_dict, loadable by the model

    restored = ModelEMA(toy(True), 0.8)
    restored.load_state_dict(saved)
    assert restored.updates == 3 and int(restored.n_averaged) == 3
    twin = copy.deepcopy(model)
    train_steps(model, 2, lambda step: ema.update(model))
    train_steps(twin, 2, lambda step: restored.update(twin))
    for (name, a), b in zip(ema.module.state_dict().items(), restored.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_ema_of_another_structure_is_refused():
    ema = ModelEMA(toy(False), 0.9)
    with pytest.raises(ValueError, match="differ in structure"):
        ema.update(toy(True))


def test_the_ema_mirrors_a_syncbatchnorm_conversion():
    """Built after the conversion, the EMA holds SyncBatchNorm layers too (and the same tensors)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(toy(True))
    ema = ModelEMA(model, 0.9)
    assert [type(m) for m in ema.module.modules()] == [type(m) for m in model.modules()]


def test_schedule_and_torchvision_decay_adjustment():
    schedule = EMASchedule(every_steps=4, warmup_steps=8)
    assert [s for s in range(1, 17) if schedule.due(s)] == [4, 8, 12, 16]
    assert [schedule.copies(s) for s in (4, 8, 12)] == [True, True, False]
    # torchvision's V2 ResNet-50 recipe: decay 0.99998, 32 steps, global batch 1024, 600 epochs
    assert adjusted_decay(0.99998, 1024, 32, 600) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert adjusted_decay(0.5, 1024, 32, 1) == 0.0  # alpha capped at 1


# ----------------------------------------------------------------------------- in a training run

def test_a_run_keeps_evaluates_and_saves_the_ema(out_dir):
    """decay 0 and an update every step: the EMA is the weights, bit for bit (lerp with weight 1
    returns the end point exactly), so every EMA number equals the weights' number."""
    from conftest import load_ckpt, train_in_process
    from distcls.tracking.metrics import read_jsonl

    summary = train_in_process(
        out_dir, "train.epochs=2", "train.ema.enabled=true", "train.ema.decay=0.0", "train.ema.every_steps=1"
    )
    ck = load_ckpt(out_dir / "checkpoints/last.pt")
    assert ck["ema"]["updates"] == ck["step"] == summary["global_step"]
    assert ck["ema"]["weights"].keys() == ck["model"].keys()
    assert all(torch.equal(ck["ema"]["weights"][k], ck["model"][k]) for k in ck["model"])
    val = [r for r in read_jsonl(out_dir / "metrics.jsonl") if r["split"] == "val"]
    assert len(val) == 2 and all(r["ema_acc"] == r["acc"] and r["ema_loss"] == r["loss"] for r in val)
    assert summary["ema_test_acc"] == summary["test_acc"] and summary["best_metric"] == "val_acc"


def test_best_pt_follows_the_chosen_metric_and_evaluate_takes_ema(out_dir, capsys):
    import json

    from conftest import load_ckpt, train_in_process
    from distcls import evaluate
    from distcls.cli import run_cli
    from distcls.tracking.metrics import read_jsonl

    summary = train_in_process(
        out_dir, "train.epochs=3", "train.ema.enabled=true", "train.ema.decay=0.9", "train.ema.every_steps=2",
        "checkpoint.best_metric=val_ema_acc",
    )
    val = [r for r in read_jsonl(out_dir / "metrics.jsonl") if r["split"] == "val"]
    best = max(val, key=lambda r: r["ema_acc"])  # the first epoch reaching it
    assert summary["best_val_acc"] == best["ema_acc"] and summary["best_metric"] == "val_ema_acc"
    from distcls.tracking.console import summary_rows
    # the final table says which
    assert ("best val accuracy (EMA)", f"{best['ema_acc']:.4f}") in summary_rows(summary, out_dir, {})
    assert load_ckpt(out_dir / "checkpoints/best.pt")["epoch"] == best["epoch"]
    capsys.readouterr()
    assert (
        run_cli(evaluate.main, ["--checkpoint", str(out_dir / "checkpoints/last.pt"), "--ema", "--json", "--no-speed"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == "ema" and report["acc"] == summary["ema_test_acc"]


def test_ema_errors_are_one_line(tmp_path, capsys):
    import subprocess

    from conftest import assert_user_error, train_in_process
    from distcls import evaluate, train
    from distcls.cli import run_cli

    code = run_cli(train.main, ["checkpoint.best_metric=val_ema_acc", f"run.out_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert_user_error(
        subprocess.CompletedProcess([], code, "", err), "checkpoint.best_metric=val_ema_acc", "train.ema.enabled=true"
    )
    plain = tmp_path / "plain"
    train_in_process(plain, "train.epochs=1", "train.max_steps_per_epoch=2")
    capsys.readouterr()
    code = run_cli(evaluate.main, ["--checkpoint", str(plain / "checkpoints/last.pt"), "--ema"])
    err = capsys.readouterr().err
    assert_user_error(subprocess.CompletedProcess([], code, "", err), "holds no EMA weights", "leave out --ema")
    # resuming a run without EMA with train.ema.enabled=true: the checkpoint has none to continue
    code = run_cli(
        train.main,
        [
            f"run.out_dir={plain}",
            "train.epochs=2",
            "train.max_steps_per_epoch=2",
            "log.every_steps=0",
            "data.batch_size=32",
            "log.plots=false",
            "train.ema.enabled=true",
            "train.ema.every_steps=1",
            "--resume",
            str(plain / "checkpoints/last.pt"),
        ],
    )
    err = capsys.readouterr().err
    assert_user_error(subprocess.CompletedProcess([], code, "", err), "holds no EMA weights", "train.ema.enabled=false")


@pytest.mark.parametrize("trained_with, overrides, key, saved", [
    # would drop the EMA
    ([], ["train.ema.enabled=false", "checkpoint.best_metric=val_acc"], "train.ema.enabled", "true"),
    # would compare val_acc with the EMA's best
    ([], ["checkpoint.best_metric=val_acc"], "checkpoint.best_metric", "val_ema_acc"),
    ([], ["train.ema.decay=0.5"], "train.ema.decay", "0.9999"),  # would continue the EMA under another decay
    # the adjusted decay depends on it
    (["train.ema.adjust_decay=true"], ["train.ema.adjust_decay=true"], "train.epochs", "1"),
])
def test_a_resume_that_drops_the_ema_or_changes_what_best_pt_follows_is_refused(
    tmp_path, capsys, trained_with, overrides, key, saved
):
    import subprocess

    from conftest import FAST, assert_user_error, train_in_process
    from distcls import train
    from distcls.cli import run_cli

    out = tmp_path / "run"
    run = [
        "train.max_steps_per_epoch=2", "train.ema.enabled=true", "train.ema.every_steps=1",
        "checkpoint.best_metric=val_ema_acc",
    ]
    train_in_process(out, "train.epochs=1", *run, *trained_with)
    before = (out / "checkpoints/last.pt").read_bytes()
    capsys.readouterr()
    code = run_cli(train.main, [f"run.out_dir={out}", *FAST, *run, "train.epochs=2", *overrides, "--resume", "auto"])
    err = capsys.readouterr().err
    assert_user_error(
        subprocess.CompletedProcess([], code, "", err), f"was saved with {key}={saved}", f"resume with {key}={saved}"
    )
    assert (out / "checkpoints/last.pt").read_bytes() == before


def test_an_ema_that_would_never_update_is_refused_at_launch(tmp_path, capsys):
    """Fewer optimizer steps than train.ema.every_steps: the EMA stayed the random initial weights and
    was evaluated, reported as "ema acc", followed by best.pt and used by --ema without a word."""
    import subprocess

    from conftest import FAST, assert_user_error
    from distcls import train
    from distcls.cli import run_cli

    code = run_cli(train.main, [f"run.out_dir={tmp_path / 'x'}", *FAST, "train.epochs=1", "train.max_steps_per_epoch=5",
                                "train.ema.enabled=true", "checkpoint.best_metric=val_ema_acc"])
    err = capsys.readouterr().err
    assert_user_error(
        subprocess.CompletedProcess([], code, "", err),
        "train.ema.every_steps=32, but this run makes only 5 optimizer steps",
        "set train.ema.every_steps <= 5",
    )
    assert not (tmp_path / "x").exists()


def test_an_ema_not_updated_yet_is_neither_evaluated_nor_followed(tmp_path, capsys):
    """Epoch 1 (3 steps) ends before the first update (every 4 steps): the epoch line says so, the val
    record has no EMA numbers, best.pt does not follow the initial weights; epoch 2 has them."""
    import json

    from conftest import assert_user_error, cli_in_process, load_ckpt, train_in_process
    from distcls.tracking.metrics import read_jsonl

    out = tmp_path / "run"
    capsys.readouterr()
    summary = train_in_process(
        out, "train.epochs=2", "train.max_steps_per_epoch=3", "train.ema.enabled=true", "train.ema.every_steps=4",
        "checkpoint.best_metric=val_ema_acc", "checkpoint.keep=5",
    )
    said = "".join(capsys.readouterr())
    val = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "val"]
    assert [r["ema_updates"] for r in val] == [0, 1]
    assert "ema_acc" not in val[0] and "ema_acc" in val[1]
    epoch_1 = next(line for line in said.splitlines() if "epoch 1/2" in line and "val loss" in line)
    assert ", ema not updated yet (train.ema.every_steps)" in epoch_1 and "(best" not in epoch_1  # nothing followed yet
    assert summary["best_val_acc"] == val[1]["ema_acc"] and load_ckpt(out / "checkpoints/best.pt")["epoch"] == 2
    # a checkpoint saved before the first update (epoch 1's): --ema is refused, the weights evaluate
    epoch_1 = out / "checkpoints/epoch_0001.pt"
    assert load_ckpt(epoch_1)["ema"]["updates"] == 0
    assert_user_error(
        cli_in_process(capsys, "evaluate", ["--checkpoint", epoch_1, "--ema"]),
        "its model EMA never updated",
        "leave out --ema",
    )
    proc = cli_in_process(
        capsys, "evaluate", ["--checkpoint", out / "checkpoints/last.pt", "--ema", "--json", "--no-speed"]
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["weights"] == "ema"


def test_the_epoch_cadence_copies_during_the_warmup_and_at_the_first_update_after_it():
    """cadence=epoch (torchvision's i % N == 0 of each epoch): with a warmup that ends mid-epoch (steps 1-5 of
    10), the updates at steps 1, 3, 5 copy and so does 7 (n_averaged was reset after 5); 9 averages."""
    schedule = EMASchedule(every_steps=2, warmup_steps=5, cadence="epoch", steps_per_epoch=10)
    due = [g for g in range(1, 21) if schedule.due(g)]
    assert due == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert [g for g in due if schedule.copies(g)] == [1, 3, 5, 7]
    whole = EMASchedule(every_steps=4, warmup_steps=10, cadence="epoch", steps_per_epoch=10)  # warmup = one epoch
    assert [g for g in range(1, 31) if whole.due(g) and whole.copies(g)] == [1, 5, 9, 11]
