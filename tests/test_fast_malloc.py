"""FAST.MALLOC_TUNING: glibc keeps large freed blocks for reuse; numbers do not change.

Every check that applies the tuning runs in a fresh process (it is process-wide and sticky)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers_train import coop_argv

from coop.config import get_cfg_default
from coop.fast.malloc import _glibc_mallopt, tune_for_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc = pytest.mark.skipif(_glibc_mallopt() is None, reason="needs glibc's malloc")

# a few layers' activations of 64 MiB each, computed and freed: the minor page faults of
# the rounds after the first
FAULTS = """
import json, resource, torch
from coop.fast.malloc import tune_malloc
state = tune_malloc()
layer = torch.nn.Linear(1024, 1024)
faults = []
with torch.no_grad():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        h = torch.ones(16384, 1024)
        for _ in range(4):
            h = torch.relu(layer(h)) * 2
        del h
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": sum(faults[1:])}))
"""


def _python(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("COOP_MALLOC_TUNING", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc
def test_large_tensors_reuse_freed_memory_instead_of_faulting_it_in_again():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    default = _python(FAULTS, COOP_MALLOC_TUNING="0")
    assert default["state"] == "disabled by $COOP_MALLOC_TUNING"
    assert default["faults"] > 5 * 9 * pages  # each round faults its 9 blocks in again
    tuned = _python(FAULTS)
    assert tuned["state"] == "applied"
    # they mostly reuse the first round's blocks (glibc before 2.38 cannot serve an aligned
    # request from a free block of exactly its size, so a few rounds may still grow the heap)
    assert tuned["faults"] < default["faults"] // 4


@glibc
@pytest.mark.parametrize(
    "env",
    [{"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}],
)
def test_the_users_own_malloc_settings_win(env):
    res = _python("import json, coop.fast.malloc as m; print(json.dumps(m.tune_malloc()))", **env)
    assert res == "left to the MALLOC_* / GLIBC_TUNABLES environment variables"


@pytest.mark.parametrize(
    "opts, device, applies",
    [([], "cpu", True), (["FAST.ENABLED", False], "cpu", False),
     (["FAST.MALLOC_TUNING", False], "cpu", False), ([], "cuda", False)],
)  # fmt: skip
def test_only_fast_runs_on_a_cpu_are_tuned(monkeypatch, opts, device, applies):
    import coop.fast.malloc as mt

    calls = []
    monkeypatch.setattr(mt, "tune_malloc", lambda enabled=True: calls.append(enabled) or "")
    cfg = get_cfg_default()
    cfg.merge_from_list(opts)
    tune_for_run(cfg, device)
    assert calls == [applies]


FEATURES = """
import json, sys, torch
from coop.fast.malloc import tune_malloc
from coop.testing.tiny_clip import tiny_clip_model
state = tune_malloc()
model = tiny_clip_model("vit", image_resolution=64, vision_width=128, vision_layers=2)
g = torch.Generator().manual_seed(0)
images = torch.randn(64, 3, 64, 64, generator=g)
text = torch.randint(1, 49000, (128, 77), generator=g)
with torch.no_grad():
    out = torch.cat([model.encode_image(images).flatten(), model.encode_text(text).flatten()])
print(json.dumps({"state": state, "bits": out.view(torch.int32).tolist()}))
"""


@glibc
def test_the_features_are_bit_identical_with_and_without_it():
    tuned = _python(FEATURES)
    plain = _python(FEATURES, COOP_MALLOC_TUNING="0")
    assert tuned["state"] == "applied" and plain["state"] != "applied"
    assert tuned["bits"] == plain["bits"]


@glibc
def test_a_cpu_run_logs_it_once_and_the_plain_path_keeps_the_default(data_root, tiny_rn, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "coop-train")
    logs = {}
    for name, extra in (("fast", []), ("plain", ["FAST.ENABLED", "False"])):
        out = str(tmp_path / name)
        argv = coop_argv(data_root, out, tiny_rn, 1, 16, *extra, "OPTIM.MAX_EPOCH", "1")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.pop("COOP_MALLOC_TUNING", None)
        proc = subprocess.run(
            [exe, *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(os.path.join(out, "log.txt"), encoding="utf-8") as f:
            logs[name] = f.read()
    assert logs["fast"].count("glibc malloc tuned for large tensors") == 1
    assert "malloc" not in logs["plain"]
