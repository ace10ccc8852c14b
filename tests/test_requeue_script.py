"""slurm/requeue_on_signal.sh's distcls_run_requeueable, run by bash with real child processes
(the SLURM commands it calls, scancel and scontrol, are stand-ins on PATH that record their calls)."""
from __future__ import annotations

import subprocess

from conftest import ROOT

# The training step: tells the batch shell "SIGUSR1" once that shell sleeps in `wait` for it, then
# exits with EXIT_CODE as soon as the shell's trap has started (scancel, below, says so), so that it
# exits while the trap runs.
STEP = r"""
echo $$ > "$WORK/step.pid"
until [ "$(cut -d' ' -f3 /proc/$PPID/stat)" = S ]; do :; done  # the batch shell waits for this step
kill -USR1 $PPID
until [ -e "$WORK/trap_running" ]; do sleep 0.01; done
exit $EXIT_CODE
"""

# scancel, called by the USR1 trap: returns only when the step has exited (and been reaped), so the
# step's exit falls inside the trap.
SCANCEL = r"""#!/bin/bash
echo "scancel $*" >> "$WORK/calls"
touch "$WORK/trap_running"
while kill -0 "$(cat "$WORK/step.pid")" 2>/dev/null; do sleep 0.01; done
"""

SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$WORK/calls"
"""


def _run(tmp_path, exit_code: int):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scancel", SCANCEL), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "step.sh").write_text(STEP)
    script = (
        f'source "{ROOT}/slurm/requeue_on_signal.sh"; set -uo pipefail; distcls_run_requeueable bash "$WORK/step.sh"'
    )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "WORK": str(tmp_path), "EXIT_CODE": str(exit_code), "SLURM_JOB_ID": "42"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    calls = (tmp_path / "calls").read_text().splitlines()
    return proc, calls


def test_a_step_that_exits_0_while_the_trap_runs_is_not_requeued(tmp_path):
    # before: the interrupted `wait`'s 138 was taken for the step's status: logged 138, requeued a finished job
    proc, calls = _run(tmp_path, 0)
    assert calls == ["scancel --signal=TERM 42"]
    assert "training step exited with 0" in proc.stdout, proc.stdout
    assert proc.returncode == 0


def test_a_step_stopped_by_the_signal_is_requeued_once_with_its_status(tmp_path):
    proc, calls = _run(tmp_path, 3)  # distcls's exit code after saving a checkpoint on SIGTERM
    assert calls == ["scancel --signal=TERM 42", "scontrol requeue 42"]
    assert "training step exited with 3" in proc.stdout, proc.stdout
    assert proc.returncode == 3
