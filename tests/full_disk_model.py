"""A plug-in model (model.name=full_disk_model:build) whose build makes this process's disk "full"
from the N-th write of checkpoints/last.pt on (model.args.full_at_save, through atomic_files'
fault hook): a full disk during a save, also under torchrun, where only rank 0 writes.
model.args.report_delay_s delays rank 0's error line, so the other rank meets the failure first (and
waits for rank 0's line however loaded the machine is)."""
import errno
import os
import time

import torch.nn as nn

from distcls.runtime import atomic_files

_KEEP = []


def build(spec, cfg, full_at_save: int = 2, report_delay_s: float = 0.0):
    writes = []
    if report_delay_s and os.environ.get("RANK", "0") == "0":
        import distcls.train

        report = distcls.train.report

        def late_report(*args):
            time.sleep(report_delay_s)
            report(*args)

        distcls.train.report = late_report
    elif report_delay_s:  # the other ranks leave rank 0 more than its delay to report (cli.PEER_REPORT_GRACE_S: 20 s)
        import distcls.cli

        distcls.cli.PEER_REPORT_GRACE_S = report_delay_s + 300

    def disk_full(stage, path, tmp):
        if stage == "written" and path.name == "last.pt":
            writes.append(path)
            if len(writes) >= full_at_save:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    _KEEP.append(atomic_files.inject_fault(disk_full))
    _KEEP[-1].__enter__()  # for the rest of this process (kept: a collected context would restore the hook)
    return nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.image_size ** 2, spec.num_classes))
