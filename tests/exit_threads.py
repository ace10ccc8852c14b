"""`python tests/exit_threads.py OUT_FILE [train args...]`: runs `python -m distcls.train` as torchrun
would, and when it has returned (before the interpreter shuts down) writes the names of the
process's native threads that are still alive to OUT_FILE.RANK. A gloo process group that outlives
the run keeps its worker threads (pt_gloo_runloop, gloo_tcp_loop) into interpreter shutdown."""
import atexit
import os
import runpy
import sys


def _write_threads(path: str) -> None:
    names = sorted(open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task"))
    with open(f"{path}.{os.environ.get('RANK', '0')}", "w") as f:
        f.write("\n".join(names) + "\n")


if __name__ == "__main__":
    out = sys.argv.pop(1)
    atexit.register(_write_threads, out)
    sys.argv[0] = "distcls.train"
    runpy.run_module("distcls.train", run_name="__main__", alter_sys=True)
