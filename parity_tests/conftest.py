"""Test-session isolation: the parity cache (parity_tests/cache.py, under $XDG_CACHE_HOME/convnextv2) of a
test run is a fresh folder of its own, so no test sees what an earlier run or the user's own parity runs left,
and nothing is left in the user's cache. Each process (xdist worker) gets its folder; subprocesses inherit it.

Parity runs here run their runtimes in the test's own process (``CONVNEXTV2_PARITY_JOBS=1``): the tests already
keep every core busy, and a worker interpreter per run would import each framework again. The worker path has
tests of its own (test_parity_workers.py), which ask for it by name."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

_made: list[str] = []


# A folder given by the caller (nox -s parity: one for all its groups and workers, removed by nox) is used as
# is, so the matrix's cases share their exports across processes; it is the caller's to remove.
SHARED_CACHE_HOME = "CONVNEXTV2_TEST_CACHE_HOME"


def pytest_configure(config: Any) -> None:
    shared = os.environ.get(SHARED_CACHE_HOME)
    if shared:
        os.environ["XDG_CACHE_HOME"] = shared
    else:
        folder = tempfile.mkdtemp(prefix="convnextv2-test-cache-")
        _made.append(folder)
        os.environ["XDG_CACHE_HOME"] = folder
    from convnextv2.parity_tests.workers import ENV_JOBS

    os.environ.setdefault(ENV_JOBS, "1")


def pytest_unconfigure(config: Any) -> None:
    for folder in _made:
        shutil.rmtree(folder, ignore_errors=True)
