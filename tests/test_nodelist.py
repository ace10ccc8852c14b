"""SLURM nodelists expanded as SLURM does: distcls's parser against the real `scontrol show hostnames`."""
from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

import slurm_cluster
from conftest import slurm_unavailable
from distcls.runtime import dist
from distcls.runtime import nodelist
from distcls.errors import UserError

# (nodelist, hosts): SLURM 22.05+ answers (Debian's scontrol) and the cases of Lightning's SLURM environment tests
KNOWN = [
    ("alpha beta gamma", ["alpha", "beta", "gamma"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("gpu[03-05,09],cpu1", ["gpu03", "gpu04", "gpu05", "gpu09", "cpu1"]),
    ("n[0012-0015]", ["n0012", "n0013", "n0014", "n0015"]),
    ("a-b[1-2]", ["a-b1", "a-b2"]),
    ("a,b c", ["a", "b", "c"]),
    ("a[9-11]", ["a9", "a10", "a11"]),
    ("a[08-100]", ["a08", "a09"] + [f"a{i}" for i in range(10, 101)]),
    ("a[1-010]", [f"a{i}" for i in range(1, 11)]),
    ("a[1-2,5]-b[7,9]", ["a1-b7", "a1-b9", "a2-b7", "a2-b9", "a5-b7", "a5-b9"]),
    ("a[1-2]b[3]c[5-6]", ["a1b3c5", "a1b3c6", "a2b3c5", "a2b3c6"]),
    ("a[1-2]b[3-4]c[5-6]", ["a1b3c5", "a1b3c6", "a2b3c5", "a2b3c6", "a1b4c5", "a1b4c6", "a2b4c5", "a2b4c6"]),
    ("a[1-3,2]", ["a1", "a2", "a3", "a2"]),
    ("a,,b,", ["a", "b"]),
    ("[1-2]", ["1", "2"]),
    ("node1", ["node1"]),
    ("host[5-9]", ["host5", "host6", "host7", "host8", "host9"]),
    ("host[5,7,9]", ["host5", "host7", "host9"]),
    ("host[1,5-9]", ["host1", "host5", "host6", "host7", "host8", "host9"]),
    ("host[5-7],host[0]", ["host5", "host6", "host7", "host0"]),
    ("alpha,beta,gamma", ["alpha", "beta", "gamma"]),
    ("alpha-0,alpha-1,alpha-2", ["alpha-0", "alpha-1", "alpha-2"]),
    ("alpha.dot-[0-2]", ["alpha.dot-0", "alpha.dot-1", "alpha.dot-2"]),
]


@pytest.mark.parametrize("text, hosts", KNOWN)
def test_the_parser_expands_as_slurm_does(text, hosts):
    assert nodelist.expand(text) == hosts


INVALID = ["x[1-3]y", "a[1-2]b", "a[3-1]", "a[]", "ab[x-y]", "a[1-2", "a]1[", "a[[1]]", "", " , ", "[broken"]


@pytest.mark.parametrize("text", INVALID)
def test_a_nodelist_the_parser_refuses_is_a_clear_error_without_scontrol(text, monkeypatch):
    with pytest.raises(UserError, match="cannot parse SLURM_JOB_NODELIST=.*set MASTER_ADDR explicitly"):
        nodelist.expand(text)
    monkeypatch.setenv("PATH", "")  # no scontrol: the product path is the parser's
    with pytest.raises(UserError, match="cannot parse SLURM_JOB_NODELIST=.*set MASTER_ADDR explicitly"):
        nodelist.hostnames(text)


@pytest.mark.parametrize("script, hosts", [
    ('echo broken', ["broken"]),  # scontrol accepts a list the parser refuses: SLURM is the authority
    ('echo "$4" >&2; exit 1', None),  # scontrol refuses it: the parser's error
    ('echo "Invalid hostlist: $4"', None),
    ('echo "scontrol: error: no config" >&2; echo broken', None),  # a complaint on stderr: not an answer
])
def test_scontrol_answers_where_it_can_and_the_parser_where_it_cannot(tmp_path, monkeypatch, script, hosts):
    # stand-ins for scontrol's four kinds of answer (the real one is in the test below; its answers vary by version)
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\n{script}\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/bin{os.pathsep}/usr/bin")
    assert shutil.which("scontrol") == str(tmp_path / "scontrol")
    if hosts is None:
        with pytest.raises(UserError, match="cannot parse SLURM_JOB_NODELIST='\\[broken'"):
            nodelist.hostnames("[broken")
    else:
        assert nodelist.hostnames("[broken") == hosts
    # a list both accept: scontrol's answer where it gives one
    assert nodelist.hostnames("gpu[07-08]") == (hosts or ["gpu07", "gpu08"])


def test_srun_tasks_rendezvous_at_the_first_host_slurm_names(monkeypatch):
    # before: 'alpha beta gamma' gave the whole string and 'a[1-2]b[3-4]' gave 'a1' (hosts that do not exist)
    monkeypatch.setenv("PATH", "")  # no scontrol: distcls's own parser
    assert dist.first_host("alpha beta gamma") == "alpha"
    assert dist.first_host("a[1-2]b[3-4]") == "a1b3"


def _random_nodelist(rng: random.Random) -> str:
    def number(width):
        return str(rng.randrange(0, 10 ** width)).zfill(rng.choice([1, width]))

    def bracket():
        parts = []
        for _ in range(rng.randint(1, 3)):
            lo = number(rng.randint(1, 3))
            if rng.random() < 0.6:
                parts.append(f"{lo}-{int(lo) + rng.randint(0, 12)}")
            else:
                parts.append(lo)
        return "[" + ",".join(parts) + "]"

    def name():
        prefix = "".join(rng.choice("abcdefgpu-.") for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.3:
            return prefix + str(rng.randint(0, 99))  # one host
        text = prefix + bracket()
        for _ in range(rng.choice([0, 0, 1, 2])):  # multi-range names: a[1-2]b[3-4]
            text += "".join(rng.choice("xyz-") for _ in range(rng.randint(0, 2))) + bracket()
        return text

    separators = [",", " ", ", ", "\t"]
    return "".join(name() + rng.choice(separators) for _ in range(rng.randint(1, 4))).rstrip(", \t")


@pytest.mark.slow
@pytest.mark.slurm  # on a fresh machine SLURM's packages are installed in the background (tests/slurm_cluster.py)
def test_the_parser_agrees_with_scontrol_on_generated_nodelists(tmp_path, monkeypatch):
    # (slurm-client alone is enough; else the test cluster's install, waited for while it runs: dpkg may
    # have unpacked scontrol but not yet set it up)
    if slurm_cluster.still_installing() or shutil.which("scontrol") is None:
        try:
            slurm_cluster.ensure_installed()
        except slurm_cluster.ClusterUnavailable as exc:
            slurm_unavailable("SLURM's scontrol is not available", exc)
    # scontrol only needs a config file to expand a nodelist (no daemon)
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=nodelists\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=localhost\n"
    )
    monkeypatch.setenv("SLURM_CONF", str(conf))
    rng = random.Random(18)
    cases = [text for text, _ in KNOWN] + [_random_nodelist(rng) for _ in range(150)]
    for text in cases:
        proc = subprocess.run(["scontrol", "show", "hostnames", "--", text], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and not proc.stderr, (text, proc.stderr)
        assert nodelist.expand(text) == proc.stdout.split(), text
        assert nodelist.hostnames(text) == proc.stdout.split(), text  # the product path: scontrol itself

    # lists distcls's parser refuses: scontrol is the authority where it is installed (its answer is
    # used, whatever its version makes of the list), the parser's one-line error where scontrol refuses too
    for text in INVALID:
        proc = subprocess.run(["scontrol", "show", "hostnames", "--", text], capture_output=True, text=True, timeout=60)
        if (
            proc.returncode == 0
            and not proc.stderr.strip()
            and proc.stdout.split()
            and not proc.stdout.startswith("Invalid")
        ):
            assert nodelist.hostnames(text) == proc.stdout.split(), text
        else:
            with pytest.raises(UserError, match="cannot parse SLURM_JOB_NODELIST"):
                nodelist.hostnames(text)
