"""Test hooks, on the PYTHONPATH of a run that a test stops from outside, so that the stop lands
where the test wants it however loaded the machine is (the run's numbers are unchanged):

- DISTCLS_TEST_PAUSE_AT="EPOCH:STEP" (as metrics.jsonl numbers them) and DISTCLS_TEST_PAUSE_GATE=FILE
  (tests/test_resume.py): rank 0 waits right after it writes that step's train record until FILE
  exists. The test sees the record, sends its signal or kill -9, then creates FILE. Without the pause
  the signal had about a second of steps to land in.
- DISTCLS_TEST_PAUSE_MARK=FILE (tests/test_slurm.py's requeued jobs): rank 0 waits after its first
  checkpoint until a stop signal has reached it, then creates FILE, so a later process of the job (the
  requeued one) does not wait. The test sends SIGUSR1 to the batch shell once that checkpoint exists;
  without the pause the signal's way through SLURM raced the rest of the training.

Every wait ends after 300 s at most (well within the other ranks' collective timeout, dist.timeout_s=600,
as they wait in their next collective meanwhile); the mark is only made when the signal came."""
import os

_RANK_0 = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _wait_until(done, bound_s: float = 300) -> None:
    import time

    deadline = time.monotonic() + bound_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)


if _RANK_0 and os.environ.get("DISTCLS_TEST_PAUSE_AT"):
    from pathlib import Path

    from distcls.tracking import metrics

    _at = tuple(int(n) for n in os.environ["DISTCLS_TEST_PAUSE_AT"].split(":"))
    _gate = Path(os.environ["DISTCLS_TEST_PAUSE_GATE"])
    _write = metrics.MetricsLog.write

    def _write_then_pause(self, record: dict) -> None:
        _write(self, record)
        if record.get("split") == "train" and (record.get("epoch"), record.get("epoch_step")) == _at:
            _wait_until(_gate.exists)

    metrics.MetricsLog.write = _write_then_pause

if _RANK_0 and os.environ.get("DISTCLS_TEST_PAUSE_MARK"):
    from pathlib import Path

    from distcls.runtime import signals
    from distcls.checkpoint import checkpointer

    _mark = Path(os.environ["DISTCLS_TEST_PAUSE_MARK"])
    _handle, _save = signals.StopRequest._handle, checkpointer.Checkpointer.save
    _caught = []

    def _handle_and_note(self, signum, frame):
        _caught.append(signum)
        return _handle(self, signum, frame)

    def _save_then_pause(self, *args, **kwargs):
        saved = _save(self, *args, **kwargs)
        if saved is not None and not _mark.exists():
            _wait_until(lambda: bool(_caught))
            if _caught:
                _mark.touch()
        return saved

    signals.StopRequest._handle = _handle_and_note
    checkpointer.Checkpointer.save = _save_then_pause


# DISTCLS_TEST_CHECK_LOG=PREFIX (tests/test_folder_index.py): every file a rank checks while it
# indexes an image folder is appended to PREFIX.<rank>, to show that the ranks divide the check.
if os.environ.get("DISTCLS_TEST_CHECK_LOG"):
    import distcls.data.transforms.images as _images

    _inspect = _images.inspect_image_file
    _log = f"{os.environ['DISTCLS_TEST_CHECK_LOG']}.{os.environ.get('RANK', '0')}"

    def _logged_inspect(path):
        with open(_log, "a") as f:
            f.write(f"{path}\n")
        return _inspect(path)

    _images.inspect_image_file = _logged_inspect
