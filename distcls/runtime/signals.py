"""Stop requests: SIGTERM (preemption, scancel, torchrun shutdown), SIGUSR1 (SLURM's warning
signal, `#SBATCH --signal=USR1@120`) and SIGINT (Ctrl-C) set a flag; the training loop checks it
at every step boundary, all ranks agree, a checkpoint is saved and the process exits with
ExitCode.PREEMPTED. A second Ctrl-C interrupts at once; a SIGINT within SAME_CTRL_C_S (1 s) of the
first is the same Ctrl-C delivered twice (a terminal and a wrapper both forwarding it) and is ignored.
"""
from __future__ import annotations

import signal
import threading
import time

from distcls.runtime import dist
from distcls.errors import SecondInterrupt


class StopRequest:
    """`requested`: this process got a stop signal. `agreed`: every rank knows that some rank got
    one, at the same step (set by the training step that agreed it, or by `agree`)."""
    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
    # A SIGINT this soon after the first is the same Ctrl-C delivered twice, not a second one (seconds).
    SAME_CTRL_C_S = 1.0

    def __init__(self):
        self.signal_name: str | None = None
        self.agreed = False
        self._first_sigint = 0.0
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agree(self, device) -> bool:
        """Collective (every rank): `agreed` from every rank's signal so far (one all-reduce)."""
        self.agreed = dist.any_rank(self.agreed or self.requested, device)
        return self.agreed

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name == "SIGINT":
            if time.monotonic() - self._first_sigint < self.SAME_CTRL_C_S:
                return  # one Ctrl-C delivered twice (the terminal and a wrapper such as `timeout --foreground`)
            raise SecondInterrupt
        if name == "SIGINT" and self.signal_name is None:
            self._first_sigint = time.monotonic()
        self.signal_name = self.signal_name or name

    def install(self) -> "StopRequest":
        """Catch the signals (from the main thread; again on an installed request: a no-op)."""
        if not self._previous and threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
