"""SLURM nodelists (`SLURM_JOB_NODELIST`), expanded to host names as SLURM itself does.

`hostnames` asks `scontrol show hostnames` when it is on PATH (SLURM is the authority on its own
syntax) and otherwise uses `expand`, a parser of the same grammar, checked against the real scontrol
by tests/test_nodelist.py over generated nodelists:

- hosts are separated by commas or whitespace outside brackets: `a,b c` -> a b c;
- a bracket holds comma-separated numbers and ranges, `lo-hi` with lo <= hi, each zero-padded to
  the width of its first number: `n[08-10,3]` -> n08 n09 n10 n3;
- several brackets in one name multiply, in SLURM's order (the last bracket varies fastest, then the
  first, the second, ...): `a[1-2]b[3-4]` -> a1b3 a1b4 a2b3 a2b4; text after the last bracket is not
  allowed (`x[1-3]y` is invalid to SLURM too).
"""
from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from typing import Optional

from distcls.errors import UserError

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


class NodelistError(UserError):
    pass


def _invalid(nodelist: str, why: str) -> NodelistError:
    return NodelistError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r} ({why}); set MASTER_ADDR explicitly")


def _split_top_level(nodelist: str) -> list:
    names, depth, current = [], 0, []
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise _invalid(nodelist, "']' without '['")
        if depth == 0 and (ch == "," or ch.isspace()):
            names.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise _invalid(nodelist, "unclosed '['")
    names.append("".join(current))
    return [n for n in names if n]


def _expand_bracket(nodelist: str, body: str) -> list:
    numbers = []
    for part in body.split(","):
        m = _RANGE.fullmatch(part)
        if not m:
            raise _invalid(nodelist, f"bad range {part!r}")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise _invalid(nodelist, f"range {part!r} runs backwards")
        numbers.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return numbers


def _expand_name(nodelist: str, name: str) -> list:
    parts = re.split(r"\[([^\[\]]*)\]", name)  # literal, bracket body, literal, ..., literal
    literals, brackets = parts[0::2], parts[1::2]
    if any("[" in lit or "]" in lit for lit in literals):
        raise _invalid(nodelist, "nested brackets")
    if brackets and literals[-1]:
        raise _invalid(nodelist, f"text {literals[-1]!r} after the last bracket of {name!r}")
    choices = [_expand_bracket(nodelist, body) for body in brackets]
    # SLURM's order: the last bracket varies fastest, then the first, the second, ... (the one before
    # the last varies slowest): a[1-2]b[3-4]c[5-6] -> a1b3c5 a1b3c6 a2b3c5 a2b3c6 a1b4c5 ...
    slowest_first = list(range(len(brackets) - 2, -1, -1)) + [len(brackets) - 1] if brackets else []
    hosts = []
    for combo in itertools.product(*(choices[i] for i in slowest_first)):
        number = dict(zip(slowest_first, combo))
        hosts.append("".join(lit + number[i] for i, lit in enumerate(literals[:-1])) + literals[-1])
    return hosts


def expand(nodelist: str) -> list:
    """Host names of a SLURM nodelist, in SLURM's order (duplicates kept), without asking SLURM."""
    hosts = [host for name in _split_top_level(nodelist) for host in _expand_name(nodelist, name)]
    if not hosts:
        raise _invalid(nodelist, "no host")
    return hosts


def _scontrol_hostnames(nodelist: str) -> Optional[list]:
    """SLURM's own expansion, or None when scontrol is missing, fails or calls the list invalid."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        proc = subprocess.run(
            [scontrol, "show", "hostnames", "--", nodelist], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = proc.stdout.split()
    if proc.returncode != 0 or proc.stderr.strip() or not hosts or proc.stdout.startswith("Invalid hostlist"):
        return None
    return hosts


def hostnames(nodelist: str) -> list:
    """Host names of a SLURM nodelist: scontrol's answer when it can give one, else `expand`'s.

    SLURM is the authority on its own syntax: a list scontrol accepts is expanded as scontrol says
    even where `expand` would refuse it (Debian's scontrol 22.05 reads `[broken` as `broken`); only a
    list scontrol refuses too, or any list where scontrol is missing, meets `expand`'s error."""
    return _scontrol_hostnames(nodelist) or expand(nodelist)
