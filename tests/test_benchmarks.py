"""The benchmark script's own logic (its timings are not tested: they live in benchmarks/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import run as bench  # noqa: E402


def test_class_names_of_the_cases():
    names = bench.benchmark_classnames(100)
    assert len(set(names)) == 100
    assert "face" in names and "car side" in names and all("_" not in n for n in names)
    many = bench.benchmark_classnames(1000)
    assert len(set(many)) == 1000
    assert bench.benchmark_classnames(1000) == many  # deterministic


@pytest.mark.parametrize(
    "value,target,result",
    [(3.0, (">=", 2.5), "PASS"), (2.0, (">=", 2.5), "FAIL"), (0.1, ("<=", 0.15), "PASS")],
)
def test_row_judges_against_the_target(value, target, result):
    r = bench.row("c", "s", 1.0, 1.0, value, target)
    assert r["result"] == result and r["passed"] == (result == "PASS")
    skipped = bench.row("c", "s", None, 1.0, None, target, skip="does not fit")
    assert skipped["passed"] is None and skipped["result"] == "SKIP (does not fit)"


def _child(fast: bool, limit: int) -> dict:
    spec = dict(quick=True, device="cpu", shape="RN50", n_cls=300, fast=fast, threads=1)
    spec["limit"] = limit
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--memory-child"]
        + [json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_step_that_does_not_fit_under_the_cap_reports_instead_of_crashing():
    # the plain 300-class step needs ~780 MiB more than the fast one; cap between the two
    base = _child(fast=True, limit=0)
    cap = base["data_after"] + 300 * 2**20
    plain = _child(fast=False, limit=cap)
    assert plain["oom"] is True and plain["limit"] == cap
    assert "allocate" in plain["error"]
    fast = _child(fast=True, limit=cap)
    assert not fast.get("oom") and 0 < fast["extra"] < 300 * 2**20
