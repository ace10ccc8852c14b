"""What a person sees: console lines, the progress bar, plots, wandb (offline) across a resume."""
import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_user_error, child_env, cli_in_process, load_ckpt, run_in_process, train_in_process

PLOTS = ("curves.png", "lr.png", "confusion.png", "per_class.png", "samples.png")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    summary = train_in_process(out, "train.epochs=2", "log.every_steps=10", "log.plots=true")
    return out, summary


def assert_png(path: Path, min_side: int = 200, max_side: int = 4000):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        w, h = img.size
    assert min_side <= w <= max_side and min_side <= h <= max_side, f"{path.name}: {w}x{h}"
    return w, h


# ------------------------------------------------------------------------- plots


def test_training_writes_every_plot_and_plot_cli_remakes_them(run):
    out, _ = run
    for name in PLOTS:
        assert_png(out / "plots" / name)
    for name in PLOTS:
        (out / "plots" / name).unlink()
    from distcls import plot
    assert plot.main([str(out)]) == 0  # from the run's files: metrics.jsonl, config.yaml, checkpoints/last.pt
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(PLOTS)
    for name in PLOTS:
        assert_png(out / "plots" / name)


def test_plot_cli_on_a_run_without_checkpoints_draws_the_curves(run, tmp_path, capsys):
    out, _ = run
    partial = tmp_path / "going"
    partial.mkdir()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # a run in its first epoch, torn last line
    (partial / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n{\"torn")
    (partial / "config.yaml").write_text((out / "config.yaml").read_text())
    from distcls import plot
    assert plot.main([str(partial)]) == 0
    assert "plotting the curves only" in capsys.readouterr().out
    assert sorted(p.name for p in (partial / "plots").iterdir()) == ["curves.png", "lr.png"]
    assert_png(partial / "plots" / "curves.png")


def test_odd_lines_in_metrics_jsonl_are_skipped_by_plot_and_resume(run, tmp_path):
    """Valid JSON that is not a record (not an object, a text loss) crashed
    `plot` and `train --resume auto`."""
    import shutil
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    good = (copy / "metrics.jsonl").read_text()
    record = json.loads(good.splitlines()[0])
    odd = ["3", "[1, 2]", '"note"', "null", json.dumps({**record, "loss": "high"}), json.dumps({**record, "step": "7"}),
           json.dumps({**record, "split": 5}), json.dumps({**record, "acc": True})]
    (copy / "metrics.jsonl").write_text(good + "\n".join(odd) + "\n")
    from distcls import plot
    from distcls.tracking import read_jsonl
    assert read_jsonl(copy / "metrics.jsonl") == [json.loads(line) for line in good.splitlines()]
    assert plot.main([str(copy), "--no-eval"]) == 0
    summary = train_in_process(copy, "train.epochs=3", "log.every_steps=10", resume="auto")
    assert summary["epochs_completed"] == 3
    assert all(json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines())


def test_plot_cli_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert_user_error(cli_in_process(capsys, "plot", [tmp_path]), "not a distcls run directory")


def test_class_plots_stay_readable_for_100_classes(tmp_path):
    from distcls.tracking.plots import plot_confusion, plot_per_class
    g = torch.Generator().manual_seed(0)
    confusion = torch.randint(0, 3, (100, 100), generator=g) + torch.diag(torch.randint(5, 20, (100,), generator=g))
    names = [f"class_{i:03d}" for i in range(100)]
    w, h = assert_png(plot_confusion(confusion, names, tmp_path / "c.png"), min_side=800, max_side=3000)
    w2, h2 = assert_png(plot_per_class(confusion, names, tmp_path / "p.png"), min_side=500, max_side=3000)
    assert h2 > 1200  # one readable bar per class


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_output_has_the_umasks_mode(tmp_path, mask, mode):
    """A team reads each other's runs: config.yaml, metrics.jsonl, summary.json, checkpoints
    (best/epoch ones are hard links of last.pt) and plots get 0666 less the umask, as open() would."""
    previous = os.umask(mask)
    try:
        train_in_process(tmp_path / "run", "train.epochs=2", "log.plots=true", "checkpoint.keep=2")
    finally:
        os.umask(previous)
    out = tmp_path / "run"
    files = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    for name in (
        "config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt",
        "plots/curves.png",
    ):
        assert name in files, sorted(files)
    assert any(name.startswith("checkpoints/epoch") for name in files), sorted(files)
    wrong = {name: oct(m) for name, m in files.items() if m != mode and name != ".lock"}
    assert not wrong, f"want {oct(mode)} under umask {oct(mask)}: {wrong}"


# ------------------------------------------------------------------------- console


def test_plain_output_is_greppable_lines_without_control_characters(tmp_path, capsys):
    # pytest's stdout is not a terminal
    train_in_process(tmp_path / "run", "train.epochs=1", "log.every_steps=5", "log.plots=true")
    out = capsys.readouterr().out
    assert not CONTROL.search(out), repr(CONTROL.search(out))
    lines = out.splitlines()
    assert all(re.match(r"\[\d\d:\d\d:\d\d\] ", line) for line in lines), lines
    assert any(re.search(r"epoch 1 step 5 loss \d\.\d{4} acc \d\.\d{4} \| \d+ img/s, lr ", l) for l in lines)
    assert any(
        re.search(r"epoch 1/1 train loss \d\.\d{4} acc \d\.\d{4} \| val loss \d\.\d{4} acc \d\.\d{4} \(best ", l)
        for l in lines
    )
    assert any("summary: test accuracy: " in l for l in lines) and any(
        f"summary: plots: {tmp_path / 'run'}/plots/" in l for l in lines
    )


@pytest.mark.slow
def test_progress_bar_on_a_terminal_shows_the_running_loss(tmp_path):
    import pty
    leader, follower = pty.openpty()
    env = child_env({"COLUMNS": "200", "TERM": "xterm-256color"})
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "distcls.train", f"run.out_dir={tmp_path / 'run'}", "train.epochs=1",
            "data.batch_size=4", "log.every_steps=0", "log.plots=false",
        ],
        cwd=ROOT,
        env=env,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    bar = [frame for frame in re.split(r"[\r\n]", screen) if "epoch 1/1" in frame and "━" in frame]
    assert any(re.search(r"loss \d\.\d{4} acc \d\.\d{3} lr \S+ [\d,]+ img/s", f) for f in bar), screen[-3000:]
    assert "distcls run summary" in screen and "test accuracy" in screen


# ------------------------------------------------------------------------- wandb (offline)


def wandb_records(path: Path):
    """The records of a wandb .wandb file (LevelDB-log framing of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def outside_out_dir(home: Path) -> list:
    """Files written under the (fake) home; matplotlib's shared font cache is the documented exception."""
    return [p for p in home.rglob("*") if p.is_file() and "matplotlib" not in p.parts]


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for var in list(os.environ):
        if var.startswith("WANDB_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("NETRC", str(home / "no-netrc"))
    return home


@pytest.mark.slow  # two runs with wandb's service process: about 10 s
def test_wandb_without_api_key_goes_offline_and_a_resume_continues_the_same_run(
    tmp_path, clean_wandb_env, monkeypatch, capsys
):
    from distcls.run.runner import Stopped
    from distcls.tracking import console

    out = tmp_path / "run"
    wb = ["log.wandb.enabled=true", "log.wandb.mode=online", "log.wandb.name=digits-a", "log.wandb.tags=[t1,t2]",
          "log.wandb.group=g", "log.wandb.notes=n", "train.epochs=2", "log.every_steps=4", "data.max_train_samples=320",
          "log.plots=true"]
    calls = {"n": 0}
    advance = console.Console.advance

    def stop_at_step_15(self, *a, **k):  # what SLURM's requeue does: SIGTERM in the middle of epoch 2
        calls["n"] += 1
        if calls["n"] == 15:
            os.kill(os.getpid(), signal.SIGTERM)
        return advance(self, *a, **k)

    monkeypatch.setattr(console.Console, "advance", stop_at_step_15)
    assert isinstance(run_in_process(out, *wb), Stopped)
    said = capsys.readouterr()
    err = said.err
    assert err.count("wandb has no API key") == 1 and "logging offline" in err
    # the one console line
    assert "wandb: offline run " in said.out and f"upload it with `wandb sync {out / 'wandb'}/offline-run-" in said.out
    monkeypatch.setattr(console.Console, "advance", advance)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment wins over log.wandb.mode
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-0123456789")
    summary = train_in_process(out, *wb, resume="auto")
    assert "wandb has no API key" not in capsys.readouterr().err
    # run.finish() only informs wandb's service process, which closes the run's .wandb file later:
    # read the files once the service is gone (what a process's exit waits for), not while it may still write
    import wandb
    wandb.teardown()

    run_id = load_ckpt(out / "checkpoints/last.pt")["progress"]["wandb_id"]
    dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(run_id) for d in dirs)  # one folder per process start, ONE run
    steps, run_names, test_acc, keys = [], set(), None, set()
    for d in dirs:
        for r in wandb_records(d / f"run-{run_id}.wandb"):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                assert r.run.run_id == run_id and list(r.run.tags) == ["t1", "t2"] and r.run.run_group == "g"
                run_names.add(r.run.display_name)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                steps.append(r.history.step.num)
                keys |= set(items)
                test_acc = items.get("test/acc", test_acc)
    assert run_names == {"digits-a"}
    assert steps == sorted(set(steps)), f"steps repeat or go back: {steps}"  # continuing, no duplicates
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(steps) == {r["step"] for r in records}  # every logged step of the run is in wandb
    assert test_acc == pytest.approx(summary["test_acc"])
    assert {"train/loss", "val/acc", "test/acc"} <= keys  # the plots, as wandb images:
    assert {f"plots/{name[:-4]}/_type" for name in PLOTS} <= keys
    for f in [out / "config.yaml", out / "metrics.jsonl", out / "summary.json", *(out / "checkpoints").iterdir()]:
        assert b"secret-key-0123456789" not in f.read_bytes(), f
    assert outside_out_dir(clean_wandb_env) == []
    assert "WANDB_CACHE_DIR" not in os.environ  # the run's own settings are gone with it


def test_wandb_mode_disabled_in_the_environment_writes_nothing(tmp_path, clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    train_in_process(tmp_path / "run", "train.epochs=1", "log.wandb.enabled=true", "log.wandb.mode=offline")
    assert not (tmp_path / "run" / "wandb").exists() and outside_out_dir(clean_wandb_env) == []


def test_wandb_mode_comes_from_the_environment_and_online_needs_a_key(tmp_path):
    from distcls.tracking.wandb_logger import resolve_mode
    no_key = {"NETRC": str(tmp_path / "none")}
    assert resolve_mode("online", no_key)[0] == "offline" and "WANDB_API_KEY" in resolve_mode("online", no_key)[1]
    assert resolve_mode("online", {**no_key, "WANDB_API_KEY": "k"}) == ("online", None)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert resolve_mode("online", {"NETRC": str(tmp_path / "netrc")}) == ("online", None)
    assert resolve_mode("online", {**no_key, "WANDB_MODE": "disabled"}) == ("disabled", None)
    assert resolve_mode("offline", {**no_key, "WANDB_DISABLED": "true"}) == ("disabled", None)
    assert resolve_mode("disabled", {**no_key, "WANDB_MODE": "offline"}) == ("offline", None)


def test_metrics_lines_that_python_cannot_parse_are_skipped(tmp_path):
    """A line nested past the recursion limit (RecursionError) or an integer of over 4,300 digits
    (ValueError, not JSONDecodeError) crashed read_jsonl, hence plot and train --resume auto."""
    from distcls.tracking import read_jsonl

    good = {
        "epoch": 1,
        "step": 2,
        "split": "train",
        "loss": 0.5,
        "acc": 0.5,
        "lr": 0.1,
        "images_per_sec": 1.0,
        "time": 1.0,
    }
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        json.dumps(good)
        + "\n"
        + "[" * 100_000
        + "]" * 100_000
        + "\n"
        + '{"split": "train", "step": '
        + "1" * 5000
        + "}\n"
    )
    assert read_jsonl(path) == [good]


def test_summary_and_checkpoints_say_where_they_came_from(tmp_path):
    """Versions, the git commit of the working directory, the command line and the hosts, in summary.json and every
    checkpoint."""
    import json
    import socket
    import subprocess

    import torch

    from conftest import load_ckpt, train_in_process
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "-c",
            "user.email=t@t",
            "-c",
            "user.name=t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    import os
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        train_in_process(tmp_path / "run", "train.epochs=1", "train.max_steps_per_epoch=2")
    finally:
        os.chdir(cwd)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    p = summary["provenance"]
    assert p["torch"] == torch.__version__ and p["distcls"] and p["python"]
    assert (
        p["git"] == {"commit": commit, "dirty": False} and p["hosts"] == [socket.gethostname()] and p["world_size"] == 1
    )
    assert "command" in p and p["cwd"] == str(repo)
    assert load_ckpt(tmp_path / "run/checkpoints/last.pt")["provenance"] == p


def test_the_sample_grid_shows_every_class_and_the_curves_the_ema_with_words(tmp_path, monkeypatch):
    """samples.png showed only class 0 for a class-sorted image folder; EMA curves were never drawn; legends said config
    jargon."""
    import torch

    from distcls.data import SplitView, TensorSource
    from distcls.tracking import plots
    labels = torch.arange(5).repeat_interleave(20)  # class-sorted, as an image folder's files are
    view = SplitView(TensorSource(torch.zeros(100, 1, 4, 4, dtype=torch.uint8), labels), torch.arange(100))
    picked = plots.stratified(view, 12)
    assert sorted(labels[picked.indices].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4] and len(picked) == 12
    assert len(plots.stratified(view, 500)) == 100
    drawn = {}

    def keep(fig, path, dpi=100):
        drawn[Path(path).name] = (
            [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()],
            fig._suptitle.get_text() if fig._suptitle else "",
        )
        return Path(path)
    monkeypatch.setattr(plots, "_save", keep)
    records = [
        {"epoch": 1, "epoch_step": s, "step": s, "split": "train", "loss": 1.0, "acc": 0.5, "lr": 0.1} for s in (4, 8)
    ]
    records += [
        {
            "epoch": 1,
            "step": 8,
            "split": "val",
            "loss": 0.9,
            "acc": 0.6,
            "ema_loss": 1.1,
            "ema_acc": 0.4,
            "ema_updates": 2,
            "lr": 0.1,
        },
        {"epoch": 1, "step": 8, "split": "test", "loss": 0.9, "acc": 0.6, "ema_loss": 1.1, "ema_acc": 0.4, "lr": 0.1},
    ]
    plots.plot_curves(records, tmp_path / "curves.png", run="my_run")
    legend, title = drawn["curves.png"]
    assert (
        "training, running (every 4 steps)" in legend
        and "validation, model EMA" in legend
        and "test, model EMA 0.4000" in legend
    )
    assert title == "my_run"


def test_every_evaluation_target_reaches_the_epoch_line_the_final_table_and_the_curves(tmp_path, monkeypatch):
    """The runner evaluates a list of targets (run.components.EvalTarget); the console, the final table and the plots
    read any target's <prefix>loss/<prefix>acc, not only the model EMA's: a new one (here "swa_") needs none there."""
    from distcls.tracking import plots
    from distcls.tracking.console import epoch_line, summary_rows

    train = {"loss": 1.0, "acc": 0.5, "images_per_sec": 100.0, "lr": 0.1}
    val = {"loss": 0.9, "acc": 0.6, "ema_updates": 3, "ema_loss": 1.1, "ema_acc": 0.4, "swa_loss": 0.8, "swa_acc": 0.7}
    line = epoch_line(1, 2, train, val, 1.0, 0.7, is_best=True)
    assert ", ema loss 1.1000 acc 0.4000, swa loss 0.8000 acc 0.7000 (best 0.7000, new best)" in line
    waiting = epoch_line(1, 2, train, {"loss": 0.9, "acc": 0.6, "ema_updates": 0, "swa_updates": 0}, 1.0, None)
    assert ", ema not updated yet (train.ema.every_steps), swa not updated yet |" in waiting
    summary = {"test_acc": 0.6, "test_count": 10, "best_val_acc": 0.7, "best_metric": "val_swa_acc",
               "ema_test_acc": 0.4, "swa_test_acc": 0.75, "per_class_test_acc": {"0": 1.0}, "epochs_completed": 2,
               "global_step": 8, "wall_time_s": 1.0, "train_images_per_sec": 100.0, "world_size": 1,
               "global_batch_size": 4}
    rows = summary_rows(summary, tmp_path, {})
    assert ("best val accuracy (SWA)", "0.7000") in rows
    assert [r for r in rows if r[0].endswith("test accuracy")] == [
        ("test accuracy", "0.6000 (10 images)"), ("EMA test accuracy", "0.4000"), ("SWA test accuracy", "0.7500")]
    legends = {}

    def keep(fig, path, dpi=100):
        legends[Path(path).name] = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
        return Path(path)
    monkeypatch.setattr(plots, "_save", keep)
    records = [{"epoch": 1, "step": 8, "split": "train", "loss": 1.0, "acc": 0.5, "lr": 0.1},
               {"epoch": 1, "step": 8, "split": "val", "lr": 0.1, **val},
               {"epoch": 1, "step": 8, "split": "test", "lr": 0.1, **val}]
    plots.plot_curves(records, tmp_path / "curves.png")
    loss, acc = legends["curves.png"]
    assert loss == ["training, epoch mean", "validation", "validation, model EMA", "validation, SWA",
                    "test 0.9000", "test, model EMA 1.1000", "test, SWA 0.8000"]
    assert acc == ["training, epoch mean", "validation", "validation, model EMA", "validation, SWA",
                   "test 0.6000", "test, model EMA 0.4000", "test, SWA 0.7000"]
