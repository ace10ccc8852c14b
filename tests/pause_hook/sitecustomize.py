"""A test hook, on the PYTHONPATH of a run that a test stops from outside (tests/test_resume.py):
rank 0's run waits right after it writes the train record of step DISTCLS_TEST_PAUSE_AT ("EPOCH:STEP",
as metrics.jsonl numbers them) until the file DISTCLS_TEST_PAUSE_GATE exists (at most 600 s). The test
sees that record, sends its signal or kill -9, then creates the gate: the signal lands at that step
however loaded the machine is (without the pause it had about a second of steps to land in). The
other ranks wait in the next step's all-reduce meanwhile. The run's numbers are unchanged."""
import os

if os.environ.get("DISTCLS_TEST_PAUSE_AT"):
    import time
    from pathlib import Path

    from distcls.tracking import metrics

    _at = tuple(int(n) for n in os.environ["DISTCLS_TEST_PAUSE_AT"].split(":"))
    _gate = Path(os.environ["DISTCLS_TEST_PAUSE_GATE"])
    _write = metrics.MetricsLog.write

    def _write_then_pause(self, record: dict) -> None:
        _write(self, record)
        if record.get("split") == "train" and (record.get("epoch"), record.get("epoch_step")) == _at:
            deadline = time.monotonic() + 600
            while not _gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    metrics.MetricsLog.write = _write_then_pause
