"""Bad input: exit code 2, ONE `distcls: error:` line that says what to do, no traceback,
nothing written outside (or even inside) run.out_dir."""
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import FAST, ROOT, assert_ok, assert_user_error, cli_in_process, run_distcls

from distcls import config, evaluate, predict, train
from distcls.cli import run_cli
from distcls.errors import ConfigError, UserError
from distcls.runtime import dist


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["optim.lrr=0.1"], ["unknown config key 'optim.lrr'", "did you mean 'optim.lr'"]),
        (["train.epochs=abc"], ["'train.epochs' must be an integer"]),
        (["data.batch_size=-4"], ["'data.batch_size' must be >= 1"]),
        (["model.name=vgg11"], ["unknown model model.name=vgg11", "resnet18"]),
        (["data.name=svhn"], ["unknown dataset data.name=svhn"]),
        (["model.name=nosuchpkg.nets:build"], ["cannot import module 'nosuchpkg.nets'"]),
        (
            ["data.name=cifar10", "data.root={tmp}/nodata"],
            ["cifar10 not found", "nodata/cifar-10-batches-py lacks data_batch_1", "data.download=true"],
        ),
        (["model.name=lenet"], ["lenet needs images of at least 16x16", "data.image_size"]),
        (["--config", "{tmp}/missing.yaml"], ["config file", "missing.yaml not found"]),
        (["--config", "{tmp}/bad.yaml"], ["not valid YAML at line 2"]),
        (["--resume", "{tmp}/nope.pt"], ["--resume", "nope.pt does not exist"]),
        (["--resume", "{tmp}"], ["is a directory"]),
        (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
        (["optim.lr"], ["not of the form key.sub=value"]),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, args, fragments):
    """In-process through the same CLI wrapper the console entry point uses (fast)."""
    (tmp_path / "bad.yaml").write_text("data:\n  name: digits: x\n")
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = run_cli(train.main, [*args, f"run.out_dir={out}"])
    captured = capsys.readouterr()
    assert_user_error(subprocess.CompletedProcess(args, code, captured.out, captured.err), *fragments)
    assert not out.exists()


def test_user_error_from_a_real_process(tmp_path):
    out = tmp_path / "out"
    proc = run_distcls("train", ["optim.lr=-1", f"run.out_dir={out}"])
    assert_user_error(proc, "'optim.lr' must be > 0")
    assert proc.stdout == "" and not out.exists()


def test_help_lists_every_option(capsys):
    # in process (each CLI's own parser, as `python -m distcls.X --help` runs it): three interpreter starts fewer
    from distcls import evaluate, predict
    for module in (train, evaluate, predict):
        with pytest.raises(SystemExit) as info:
            run_cli(module.main, ["--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert f"python -m distcls.{module.__name__.split('.')[-1]}" in out
        if module is train:
            for key in (
                "--config", "--resume", "--debug", "data.batch_size", "train.clip_grad_norm", "checkpoint.every_steps",
            ):
                assert key in out
        else:
            assert "--checkpoint" in out


def test_debug_mode_runs_a_few_steps(tmp_path, capsys):
    proc = cli_in_process(capsys, "train", ["--debug", "train.epochs=1", f"run.out_dir={tmp_path / 'dbg'}"])
    assert_ok(proc)
    assert "5 steps/epoch" in proc.stdout


DELAY_ONE_RANK = """import os, time
if os.environ.get("RANK") == os.environ.get("DISTCLS_TEST_DELAYED_RANK"):
    time.sleep(float(os.environ["DISTCLS_TEST_DELAY_S"]))
elif os.environ.get("RANK") != "0":  # a rank that fails first waits for rank 0's line however loaded the machine is
    import distcls.cli
    distcls.cli.PEER_REPORT_GRACE_S = 300.0
"""


SYNC_BN_ON_CPU = (
    "train.sync_bn=true",
    "distcls: error: train.sync_bn=true needs CUDA GPUs (torch's SyncBatchNorm does not run "
    "on CPU); set train.sync_bn=false for CPU runs",
)
BATCH_NOT_DIVISIBLE = (
    "data.batch_size=63",
    "distcls: error: data.batch_size=63 is the GLOBAL batch: it must split evenly over 2 "
    "processes x 1 accumulation steps; use a multiple of 2, e.g. data.batch_size=62",
)


@pytest.mark.slow
@pytest.mark.parametrize("delayed_rank, override, error", [pytest.param(0, *SYNC_BN_ON_CPU, id="0"),
                                                            pytest.param(1, *BATCH_NOT_DIVISIBLE, id="1")])
def test_a_config_error_under_torchrun_prints_one_line_whichever_rank_fails_first(
    tmp_path, delayed_rank, override, error
):
    """The ranks' order is forced: a sitecustomize delays one rank's start by 4 s, so the other meets
    the error first. With rank 0 delayed, rank 1 used to exit at once and torchrun killed rank 0
    before it printed: no line at all. Two of the errors only a multi-process launch can meet
    (the world size is torchrun's), one in each order."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DELAY_ONE_RANK)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]),
           "DISTCLS_TEST_DELAYED_RANK": str(delayed_rank), "DISTCLS_TEST_DELAY_S": "4"}
    proc = run_distcls("train", [override, f"run.out_dir={tmp_path / 'o'}"], nproc=2, env=env)
    assert [l for l in proc.stderr.splitlines() if l.startswith("distcls: error:")] == [error]
    assert proc.returncode != 0
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr[-3000:]  # torchrun's report: a user error
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rank, world, waits, tag", [("0", "2", False, ""), ("1", "2", True, "[rank 1] "),
                                                     ("0", "1", False, ""), (None, None, False, "")])
def test_only_a_non_zero_rank_waits_before_it_reports(monkeypatch, capsys, rank, world, waits, tag):
    """In process: a non-zero rank sleeps PEER_REPORT_GRACE_S (so rank 0 reports first), then still
    reports its own error (an error only it met is never lost), with the default SIGTERM action."""
    import signal

    from distcls import cli
    from distcls.errors import ConfigError

    for name, value in (("RANK", rank), ("WORLD_SIZE", world)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    for name in ("SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        def fail(argv):
            raise ConfigError("bad key")
        assert cli.run_cli(fail, []) == 2
        sigterm_action = signal.getsignal(signal.SIGTERM)
    finally:  # this process's handlers as they were (a waiting rank resets all three; Ctrl-C must still stop pytest)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert slept == ([cli.PEER_REPORT_GRACE_S] if waits else [])
    assert (sigterm_action == signal.SIG_DFL) == waits
    assert capsys.readouterr().err == f"distcls: error: {tag}bad key\n"


@pytest.mark.parametrize(
    "interrupt, words",
    [(KeyboardInterrupt, "while starting up, before training began; nothing was written"), ("second", "second Ctrl-C")],
)
def test_a_ctrl_c_outside_the_run_says_which_one_it_was(capsys, interrupt, words):
    """A first Ctrl-C before the run installs its handlers used to be reported as a 'second Ctrl-C'."""
    import signal as signal_mod

    from distcls.runtime.signals import StopRequest

    def main(argv):
        if interrupt is KeyboardInterrupt:
            raise KeyboardInterrupt  # Python's default SIGINT handler, before StopRequest.install
        stop = StopRequest().install()
        try:
            stop._handle(signal_mod.SIGINT, None)  # the first one only asks to stop
            stop._first_sigint -= StopRequest.SAME_CTRL_C_S  # (a second later: not the same Ctrl-C delivered twice)
            stop._handle(signal_mod.SIGINT, None)  # the second interrupts
        finally:
            stop.uninstall()

    assert run_cli(main, []) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distcls: stopped: interrupted") and words in err[0]


def test_help_lists_each_keys_choices_and_print_config_prints_the_resolved_config(tmp_path, capsys):
    import yaml

    from distcls import config, train
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # argparse's --help exits 0 after printing
        train.main(["--help"])
    assert info.value.code == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("sched.name "))
    assert "[choices: constant | cosine | step | multistep | exponential | poly | onecycle]" in line
    proc = cli_in_process(
        capsys,
        "train",
        [
            "--print-config",
            "--config",
            config.__file__.replace("distcls/config.py", "configs/cifar10_cnn3.yaml"),
            "optim.lr=0.5",
            f"run.out_dir={tmp_path / 'never'}",
        ],
    )
    assert proc.returncode == 0 and proc.stderr == ""
    printed = yaml.safe_load(proc.stdout)
    assert printed["optim"]["lr"] == 0.5 and printed["data"]["name"] == "cifar10"
    assert config.from_dict(printed) == config.load(
        config.__file__.replace("distcls/config.py", "configs/cifar10_cnn3.yaml"),
        ["optim.lr=0.5", f"run.out_dir={tmp_path / 'never'}"],
    )
    assert not (tmp_path / "never").exists()
    # checked, as a run would
    assert_user_error(cli_in_process(capsys, "train", ["--print-config", "optim.lr=-1"]), "optim.lr")


def test_a_dry_run_checks_everything_takes_one_step_and_writes_nothing(tmp_path, capsys):
    """--dry-run: config, launcher, data, model, one step, out_dir writable: a one-screen report, exit 0, nothing
    written; any problem is the run's own one line, exit 2 (for the top of an sbatch script)."""
    from conftest import cli_in_process
    out = tmp_path / "run"
    proc = cli_in_process(capsys, "train", ["--dry-run", f"run.out_dir={out}", "train.epochs=2"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "config: digits -> cnn3, 2 epochs of 22 steps, global batch 64" and lines[-1] == "dry run: OK"
    assert any(l.startswith("one training step: loss ") and "on 64 images" in l for l in lines)
    assert not out.exists()
    assert_user_error(
        cli_in_process(
            capsys, "train", ["--dry-run", f"run.out_dir={out}", "data.name=cifar10", f"data.root={tmp_path / 'none'}"]
        ),
        "cifar10 not found",
    )
    (tmp_path / "file").write_text("x")
    assert_user_error(
        cli_in_process(capsys, "train", ["--dry-run", f"run.out_dir={tmp_path / 'file'}"]), "is a file, not a directory"
    )
    assert_user_error(
        cli_in_process(
            capsys, "train", ["--dry-run", f"run.out_dir={out}", "model.name=resnet18", "data.batch_size=3000"]
        ),
        "fewer than one global batch",
    )
    assert not out.exists()
    # the dry run refuses what the real run would (a fresh start over another run) and says what a resume would do
    from conftest import train_in_process
    train_in_process(out, "train.epochs=1", "train.max_steps_per_epoch=2")
    assert_user_error(
        cli_in_process(capsys, "train", ["--dry-run", f"run.out_dir={out}", "train.epochs=2"]),
        "already holds checkpoints",
    )
    proc = cli_in_process(
        capsys,
        "train",
        [
            "--dry-run", f"run.out_dir={out}", "train.epochs=2", "train.max_steps_per_epoch=2", "data.batch_size=32",
            "--resume", "auto",
        ],
    )
    assert (
        proc.returncode == 0 and f"resume from {out / 'checkpoints' / 'last.pt'} at epoch 2, step 0" in proc.stdout
    ), proc.stderr
    assert_user_error(
        cli_in_process(
            capsys, "train", ["--dry-run", f"run.out_dir={out}", "train.epochs=2", "--resume", tmp_path / "none.pt"]
        ),
        "does not exist",
    )


@pytest.mark.slow
def test_nproc_per_node_launches_ranks_and_keeps_distcls_exit_codes(tmp_path):
    """Under plain torchrun every failure is exit 1 and ~40 lines of the agent's traceback; `--nproc_per_node N`
    (torch's elastic launch API) returns distcls's own code and shows only the workers' lines."""
    import json
    import sys

    from conftest import FAST, child_env
    env = child_env({"PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"})
    base = [sys.executable, "-m", "distcls.train", "--nproc_per_node", "2", *FAST, "dist.device=cpu"]
    bad = subprocess.run(
        [*base, f"run.out_dir={tmp_path / 'bad'}", "data.name=cifar10", f"data.root={tmp_path / 'none'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    errors = [l for l in bad.stderr.splitlines() if l.startswith("distcls: error: ")]
    assert len(errors) >= 1 and all("cifar10 not found" in l for l in errors)
    assert "Traceback" not in bad.stderr and "ChildFailedError" not in bad.stderr
    stopped = subprocess.run(
        [
            *base, f"run.out_dir={tmp_path / 'stopped'}", "model.name=stop_model:build", "model.args.stop_at=2",
            "train.epochs=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stopped.returncode == 3, stopped.stderr[-2000:]  # a stop signal: checkpoint saved, resumable
    ok = subprocess.run([*base, f"run.out_dir={tmp_path / 'ok'}", "train.epochs=1", "train.max_steps_per_epoch=3"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "ok/summary.json").read_text())["world_size"] == 2


FLOAT_KEYS = [path for path, default, _ in config.describe() if isinstance(default, float)] + ["train.clip_grad_norm"]


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_rejected_for_every_float_key(key, value):
    """NaN/inf pass every min/max check, so the schema rejects them itself."""
    with pytest.raises(ConfigError, match=f"config key '{key}' must be a finite number"):
        config.load(None, [f"{key}={value}"])


@pytest.mark.parametrize("override, key", [
    ("data.split=[.nan, 0.1, 0.1]", "data.split"), ("data.std=[.inf, 1, 1]", "data.std"),
    ("data.mean=[0, .nan, 0]", "data.mean"), ("optim.betas=[0.9, .nan]", "optim.betas"),
])
def test_non_finite_numbers_in_lists_are_rejected(override, key):
    extra = ["data.mean=[0, 0, 0]"] if key == "data.std" else ["data.std=[1, 1, 1]"] if key == "data.mean" else []
    with pytest.raises(ConfigError, match=f"config key '{key}' must be a finite number"):
        config.load(None, [override, *extra])


def test_non_finite_lr_is_a_cli_error(tmp_path, capsys):
    """Through the CLI: exit 2 before anything runs (it used to train, then exit 4)."""
    out = tmp_path / "o"
    assert_user_error(
        cli_in_process(capsys, train.main, ["optim.lr=nan", f"run.out_dir={out}"]), "'optim.lr' must be a finite number"
    )
    assert not out.exists()




def test_binary_config_file_is_a_clear_error(tmp_path, capsys):
    """UnicodeDecodeError."""
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert_user_error(
        cli_in_process(capsys, train.main, ["--config", f, f"run.out_dir={tmp_path / 'o'}"]),
        f"config file {f} is not a text file",
    )


def test_unreadable_config_file_is_a_clear_error(tmp_path, monkeypatch):
    """PermissionError (simulated: tests may run as root, for whom chmod 000 does not deny reading)."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 1\n")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match=f"config file {f} cannot be read \\(Permission denied\\)"):
        config.load(str(f))




@pytest.mark.parametrize("override, fragment", [
    ("model.name=os:system", "model.name=os:system: 'system' is a builtin_function_or_method, not a builder function"),
    ("data.name=os:system", "data.name=os:system: 'system' is a builtin_function_or_method, not a builder function"),
    ("model.name=json:dumps", "model.name=json:dumps is not a model builder: it must accept (spec, cfg)"),
    ("model.name=os:sep", "not a builder function"),
])
def test_plugin_path_that_is_not_a_builder_is_never_called(tmp_path, capsys, override, fragment):
    out = tmp_path / "o"
    assert_user_error(cli_in_process(capsys, train.main, [override, f"run.out_dir={out}"]), fragment)
    assert not out.exists()




def test_huge_seed_is_a_config_error():
    """Run.seed=1e20 (as an integer) overflowed inside numpy/torch."""
    with pytest.raises(ConfigError, match="'run.seed' must be <= 4294967295"):
        config.load(None, ["run.seed=100000000000000000000"])


def test_negative_model_width_is_a_user_error(tmp_path, capsys):
    """Model.args.width=-4."""
    assert_user_error(cli_in_process(capsys, train.main, ["model.args.width=-4", f"run.out_dir={tmp_path / 'o'}"]),
                      "model.name=cnn3 cannot be built with model.args={'width': -4}", "negative dimension")


@pytest.mark.parametrize("env", [
    {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "abc", "SLURM_LOCALID": "0"},
])
def test_bad_slurm_ntasks_is_a_user_error(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match="environment variable SLURM_NTASKS='abc' is not an integer"):
        dist.detect()


def test_bad_restart_count_is_a_user_error(tmp_path, capsys, monkeypatch):
    """TORCHELASTIC_RESTART_COUNT=abc."""
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "abc")
    out = tmp_path / "o"
    assert_user_error(
        cli_in_process(capsys, train.main, [f"run.out_dir={out}", *FAST]),
        "TORCHELASTIC_RESTART_COUNT='abc' is not an integer",
    )
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_evaluate_samples_must_be_positive(finished_run, capsys, value):
    """--samples 0 crashed in the plot, --samples -3 was accepted."""
    proc = cli_in_process(
        capsys, evaluate.main, ["--checkpoint", finished_run / "checkpoints/last.pt", "--samples", value]
    )
    assert_user_error(proc, "argument --samples")




def test_options_and_overrides_in_any_order():
    """`run.out_dir=X --config F data.root=Y` used to say 'unrecognized arguments: data.root=Y'."""
    args = train.parse_args(["run.out_dir=X", "--config", "F", "data.root=Y", "--resume", "auto", "train.epochs=1"])
    assert (
        args.config == "F"
        and args.resume == "auto"
        and args.overrides == ["run.out_dir=X", "data.root=Y", "train.epochs=1"]
    )
    args = evaluate.parse_args(["data.root=Y", "--checkpoint", "c.pt", "data.name=mnist", "--split", "val"])
    assert args.checkpoint == "c.pt" and args.split == "val" and args.overrides == ["data.root=Y", "data.name=mnist"]
    args = predict.parse_args(["a.png", "--checkpoint", "c.pt", "b.png", "--top-k", "2"])
    assert args.images == ["a.png", "b.png"] and args.top_k == 2


def test_intermixed_overrides_reach_the_run(tmp_path, capsys):
    """Through the CLI, an override after --config is applied (here: a user error from it)."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 1\n")
    proc = cli_in_process(capsys, train.main, [f"run.out_dir={tmp_path / 'o'}", "--config", f, "optim.lr=-1"])
    assert_user_error(proc, "'optim.lr' must be > 0")
