"""The run's output directory: usable before anything is built, and one run at a time.

Rank 0 checks that `run.out_dir` and the files it will write there can be written (before data
and model are built, so a bad out_dir fails in a second, not after an epoch), then holds an
exclusive `flock` on `<out_dir>/.distcls.lock` for the run's lifetime. A second run (or a second
torchrun job) at the same out_dir is refused, naming the holder. The kernel drops the lock when
its process dies, even by `kill -9`, so a lock file left behind never blocks. While the lock is
held no other writer is alive there, so temp files of killed saves are removed.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import Optional

from distcls.errors import UserError
from distcls.runtime.atomic_files import remove_stale_temps

LOCK_NAME = ".distcls.lock"
SUBDIRS = ("checkpoints",)
FILES = ("config.yaml", "metrics.jsonl", "summary.json")


def _probe_writable(directory: Path, what: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".distcls-probe."):
            pass
    except OSError as exc:
        raise UserError(
            f"{what} {directory} is not writable ({exc.strerror or exc}); fix its permissions or choose another "
            "run.out_dir"
        ) from None


NAME_MAX, PATH_MAX = 255, 4095  # bytes, Linux's limits (os.pathconf where the filesystem says otherwise)


def path_name_problem(path) -> Optional[str]:
    """Why `path` cannot name a file (a component or the whole path too long), or None."""
    path = Path(path)
    for part in path.parts:
        n = len(os.fsencode(part))
        if n > NAME_MAX:
            return f"its part {part[:24]}... is {n} bytes long; a file or directory name has at most {NAME_MAX}"
    n = len(os.fsencode(str(path.absolute())))
    if n > PATH_MAX:
        return f"it is {n} bytes long; a path has at most {PATH_MAX}"
    return None


def check_output_dir(directory, what: str) -> None:
    """Refuse a directory distcls would write files into that cannot be created or written
    (`what` names it for the user, e.g. "--out-dir"); writes nothing. Call it before the work."""
    d = Path(directory)
    problem = path_name_problem(d)
    if problem:
        raise UserError(f"{what} {d} cannot be used: {problem}; choose a shorter path")
    try:
        existing = d
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(
                f"{what} {d} cannot be {'used' if existing == d else 'created'}: {existing} is a file, not a "
                "directory; choose another path"
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(
                f"{what} {d} cannot be {'written' if existing == d else 'created'}: {existing} is not writable; "
                "fix its permissions or choose another path"
            )
    except OSError as exc:
        raise UserError(f"{what} {d} cannot be used ({exc.strerror or exc}); choose another path") from None


def check_output_file(path, what: str) -> None:
    """Refuse a file path distcls would write that is a directory or whose folder cannot be written."""
    p = Path(path)
    problem = path_name_problem(p)
    if problem:
        raise UserError(f"{what} {p} cannot be used: {problem}; choose a shorter path")
    if p.is_dir():
        raise UserError(f"{what} {p} is a directory; give a file path (e.g. {p / 'result.json'})")
    check_output_dir(p.parent, f"{what} {p}: its folder")


def check_outputs(out_dir) -> None:
    """Refuse an out_dir whose outputs cannot be written; writes nothing."""
    out = Path(out_dir)
    problem = path_name_problem(out)
    if problem:
        raise UserError(f"run.out_dir={out} cannot be used: {problem}; choose a shorter run.out_dir")
    try:
        _check_run_outputs(out)
    except OSError as exc:
        raise UserError(
            f"run.out_dir={out} cannot be used ({exc.strerror or exc}); choose another run.out_dir"
        ) from None


def _check_run_outputs(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"run.out_dir={out} is a file, not a directory; choose another run.out_dir")
    if not out.exists():
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UserError(
                f"run.out_dir={out} cannot be created: {parent} is a file, not a directory; choose another run.out_dir"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(
                f"run.out_dir={out} cannot be created: {parent} is not writable; choose another run.out_dir"
            )
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"run.out_dir={out} is not writable; fix its permissions or choose another run.out_dir")
    for name in SUBDIRS:
        p = out / name
        if p.exists() and not p.is_dir():
            raise UserError(
                f"{p} is a file, but distcls writes its checkpoints into a directory of that name; move it away or "
                "choose another run.out_dir"
            )
        if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"{p} is not writable; fix its permissions or choose another run.out_dir")
    for name in FILES:
        p = out / name
        if p.exists() and not p.is_file():
            raise UserError(
                f"{p} is a {'directory' if p.is_dir() else 'special file'}, but distcls writes a file of that name; "
                "move it away or choose another run.out_dir"
            )


class RunDirLock:
    """Exclusive lock on run.out_dir for one run; `release()` undoes a directory it created if unused."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self._fd = None
        self._created: list[Path] = []
        self.supported = True

    def acquire(self) -> "RunDirLock":
        created, d = [], self.dir
        while not d.exists():
            created.append(d)
            d = d.parent
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(
                f"cannot write to run.out_dir={self.dir} ({exc.strerror or exc}); choose a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                self.supported = False  # a filesystem without locks (some NFS setups): run unprotected
            else:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "holder unknown"
                os.close(fd)
                raise UserError(
                    f"run.out_dir={self.dir} is in use by another distcls run ({holder}); wait for it to end, "
                    "or choose another run.out_dir (nothing was written)"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd, self._created = fd, created
        _probe_writable(self.dir, "run.out_dir")
        for name in SUBDIRS:
            if (self.dir / name).is_dir():
                _probe_writable(self.dir / name, "run.out_dir subdirectory")
        return self

    def remove_stale_temps(self) -> list[Path]:
        """Temp files of killed saves (this run's own naming); safe only while the lock is held."""
        assert self._fd is not None
        return remove_stale_temps(self.dir) + [p for name in SUBDIRS for p in remove_stale_temps(self.dir / name)]

    def release(self) -> None:
        if self._fd is None:
            return
        if self._created and [p.name for p in self.dir.iterdir()] == [LOCK_NAME]:
            self.path.unlink(missing_ok=True)  # a run that failed before writing anything leaves no trace
            for d in self._created:
                try:
                    d.rmdir()
                except OSError:
                    break
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
