"""`python -m distcls.train [--config FILE] [--resume PATH|auto] [--debug] [key.sub=value ...]`

The same entry point under torchrun (`torchrun --nproc_per_node=N -m distcls.train ...`), srun,
or alone (one process, GPU if there is one, else CPU).
"""
from __future__ import annotations

import sys

from typing import Optional, Sequence

import torch

from distcls import config as config_mod
from distcls.runtime import dist, launch
from distcls.cli import ArgumentParser, exit_with, leave_rank_0_time_to_report, report
from distcls.run.components import DEBUG_STEPS_PER_EPOCH
from distcls.errors import CheckpointWriteFailed, ConfigError, ExitCode
from distcls.run.runner import Stopped, TrainingRun
from distcls.runtime.signals import StopRequest

def _choices(path: str) -> str:
    rules = config_mod.field_rules(path)
    return (
        f" [choices: {' | '.join('null' if c is None else str(c) for c in rules['choices'])}]"
        if "choices" in rules
        else ""
    )


EPILOG = "config keys (override any as key.sub=value; all of them: docs/configuration.md):\n" + "\n".join(
    f"  {path:28s} {help}{_choices(path)} [default: {default!r}]" for path, default, help in config_mod.describe())


def parse_args(argv: Sequence[str]):
    parser = ArgumentParser(
        prog="python -m distcls.train",
        description="Train an image classifier (single process, torchrun or SLURM).",
        epilog=EPILOG,
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        help="a YAML config file, or a shipped config's name (e.g. cifar10_cnn3); default: the built-in digits "
        "config, configs/default.yaml. A config without run.out_dir writes to runs/<its name>",
    )
    parser.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="resume from a checkpoint file, or 'auto': the newest valid one in run.out_dir (fresh start if none)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"one process on the first GPU (or CPU), num_workers 0, {DEBUG_STEPS_PER_EPOCH} steps per epoch, anomaly "
             "detection, deterministic algorithms, full tracebacks",
    )
    parser.add_argument(
        "--nproc_per_node",
        metavar="N",
        help="start N ranks on this node (torch's elastic launch, as torchrun "
        "--standalone) and exit with distcls's exit code; plain torchrun exits 1 on any failure",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (the file, then the overrides) as YAML and exit",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, launcher, data (and its index), model and out_dir, take one training step, report and "
             "exit; writes nothing",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=0.05 train.epochs=3"
    )
    return parser.parse_args(argv)


def check_launch(cfg, env: dist.DistEnv) -> None:
    """Config checks of a training run (some need the world size and device), still before any process group exists."""
    config_mod.check_batch_split(cfg.data.batch_size, env.world_size, cfg.train.accum_steps)
    config_mod.check_schedule(cfg)
    mix = cfg.data.mix
    if (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0) and (cfg.data.batch_size // env.world_size) % 2:
        raise ConfigError(
            f"data.mix pairs samples 2i and 2i+1 of the global batch, so each of the {env.world_size} processes needs "
            f"an even share of data.batch_size={cfg.data.batch_size}; use a multiple of {2 * env.world_size}"
        )
    config_mod.check_transfer(cfg)
    if cfg.log.tensorboard:  # the package, before the run writes anything (and in --dry-run)
        from distcls.tracking.tensorboard_logger import summary_writer_class
        summary_writer_class()
    if cfg.train.sync_bn and env.distributed and env.device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA GPUs (torch's SyncBatchNorm does not run on CPU); "
                          "set train.sync_bn=false for CPU runs")


def _dry_run(cfg, env: dist.DistEnv, debug: bool, resume: Optional[str]) -> int:
    from distcls.run.dry_run import dry_run
    dist.init(env, cfg.dist.timeout_s)
    try:
        lines = dry_run(cfg, env, debug, resume)
    finally:
        dist.teardown()
    if env.is_main:
        print("\n".join(lines), flush=True)
    return 0


def main(argv: Sequence[str], stop: Optional[StopRequest] = None) -> int:
    """`stop`: the process's stop request, which `cli` keeps installed until the process exits (a
    second SIGTERM after the save must not kill it); in-process callers leave it None (the handlers
    are restored on return)."""
    nproc, argv = launch.strip_nproc(argv)
    if nproc is not None and not parse_args(argv).print_config:  # (the arguments checked here once, not by N ranks)
        return launch.launch("train", argv, nproc)
    own_stop = stop is None
    stop = stop or StopRequest()
    args = parse_args(argv)
    cfg = config_mod.load(args.config, args.overrides)
    if args.print_config:  # what this command would run, checked: nothing started, nothing written
        print(config_mod.to_yaml(cfg), end="")
        return 0
    env = dist.detect(cfg.dist.device, cfg.dist.backend, debug=args.debug)
    renamed = config_mod.renamed_note(args.config)
    if renamed and env.is_main:
        print(f"distcls: note: {renamed}", file=sys.stderr, flush=True)
    check_launch(cfg, env)
    if args.dry_run:
        return _dry_run(cfg, env, args.debug, args.resume)
    run = TrainingRun(cfg, env, resume=args.resume, debug=args.debug)  # rank 0 now holds run.out_dir
    try:
        # The handlers are installed by run.run, after the rendezvous: a signal while a rank waits
        # for the others (a blocking C++ call, deaf to Python's handlers) still ends it at once.
        dist.init(env, cfg.dist.timeout_s)
        with torch.autograd.set_detect_anomaly(args.debug):
            outcome = run.run(stop)
        # Every rank leaves together: rank 0 may still be writing the summary and plots, and a gloo
        # rank that tore down its process group meanwhile was seen to abort at exit under load.
        dist.barrier()
    except CheckpointWriteFailed as exc:  # rank 0's save: one line (rank 0's), its own exit code (not a user's mistake)
        if env.is_main:
            report("error", exc)
        else:  # rank 0 exits 5 first (the launcher's root cause) and the launcher ends this rank; a rank exiting
            leave_rank_0_time_to_report()  # first got rank 0 killed by the launcher, at times mid-teardown (SIGABRT)
        return ExitCode.WRITE_FAILED
    finally:
        run.close()
        dist.teardown()
        if own_stop:
            stop.uninstall()
    if isinstance(outcome, Stopped):
        report("stopped", f"stopped by {outcome.signal_name}; checkpoint saved to {outcome.checkpoint}; "
                          "resume with --resume auto (same run.out_dir)")
        return ExitCode.PREEMPTED
    if stop.requested:  # after the last training step: the run finished its test evaluation, summary and plots
        report(
            "done",
            f"{stop.signal_name} arrived after the last training step; the run finished and everything is "
            f"written to {cfg.run.out_dir} (checkpoints, summary.json{', plots' if cfg.log.plots else ''}); nothing to "
            "resume",
        )
    return ExitCode.OK


def cli() -> None:
    stop = StopRequest()  # installed by the run; never uninstalled: kept until the process exits
    exit_with(lambda argv: main(argv, stop))


if __name__ == "__main__":
    cli()
