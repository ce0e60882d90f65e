"""glibc malloc tuning for runs on the fast path (``FAST.MALLOC_TUNING``).

By default glibc serves every allocation above its mmap threshold (128 KiB, rising to at
most 32 MiB as such blocks are freed) with a fresh ``mmap`` and returns it to the kernel on
``free``. A CPU forward of CLIP over a test batch allocates and frees activations of tens to
hundreds of MiB in every layer, so the kernel zeroes and faults each one in again, page by
page. Switching ``mmap`` off and keeping freed memory at the top of the heap lets them be
reused instead (benchmarks/README.md, "Whole processes"). Only where memory lives changes,
never a value; the price is that freed memory stays with the process until it exits.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# keep up to this much free memory at the top of the heap instead of giving it back
TRIM_THRESHOLD = 1 << 30

OPT_OUT_ENV = "COOP_MALLOC_TUNING"
# a user's own glibc tuning wins over ours
GLIBC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
GLIBC_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.mmap_threshold", "glibc.malloc.trim")

_state: Optional[str] = None  # what the first call decided; later calls repeat it


def _glibc_mallopt() -> Optional[Callable[[int, int], int]]:
    """glibc's ``mallopt`` if this process runs on glibc's allocator, else None."""
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc, ...
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (musl, macOS, Windows: AttributeError)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_malloc(enabled: bool = True) -> str:
    """Apply the tuning once per process (if ``enabled``, the allocator is glibc's and
    neither ``$COOP_MALLOC_TUNING=0`` nor a ``MALLOC_*_`` variable says otherwise); returns
    ``"applied"`` or why not. Logged once."""
    global _state
    if _state is not None or not enabled:
        return _state or "disabled by the config"
    if os.environ.get(OPT_OUT_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        _state = f"disabled by ${OPT_OUT_ENV}"
    elif any(v in os.environ for v in GLIBC_ENV) or any(
        t in os.environ.get("GLIBC_TUNABLES", "") for t in GLIBC_TUNABLES
    ):
        _state = "left to the MALLOC_* / GLIBC_TUNABLES environment variables"
    else:
        mallopt = _glibc_mallopt()
        if mallopt is None:
            _state = "not glibc's allocator"
        elif mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            _state = "applied"
        else:
            _state = "mallopt refused it"
    if _state == "applied":
        logger.info(
            "glibc malloc tuned for large tensors (FAST.MALLOC_TUNING): no mmap per block, "
            f"up to {TRIM_THRESHOLD >> 20} MiB kept free for reuse; ${OPT_OUT_ENV}=0 turns it off"
        )
    else:
        logger.info(f"glibc malloc tuning (FAST.MALLOC_TUNING) not applied: {_state}")
    return _state


def tune_for_run(cfg: Any, device_type: str) -> str:
    """``FAST.MALLOC_TUNING`` for a run whose model computes on ``device_type``: only a CPU
    run's activations live in host memory, and the plain path keeps the original's malloc."""
    fast = cfg.FAST
    return tune_malloc(bool(fast.ENABLED and fast.MALLOC_TUNING) and device_type == "cpu")
