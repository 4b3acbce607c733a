"""How the slow suite is scheduled (noxfile.py ``tests_slow``, parity_tests/plugin.py): every slow case at huge is
``heavy`` (run alone, after the rest) and nothing else is; the canary (parity_tests/slow_subset.txt, run by
``.ci/run``) names existing light cases and covers every slow test function that has one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from convnextv2.parity_tests import plugin

REPOSITORY = Path(__file__).resolve().parent.parent


def _collect(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPOSITORY, capture_output=True, text=True)
    assert done.returncode in (0, 5), done.stdout[-3000:] + done.stderr[-3000:]
    return [line.strip() for line in done.stdout.splitlines() if "::" in line]


@pytest.fixture(scope="module")
def collected() -> dict[str, list[str]]:
    return {"slow": _collect("-m", "slow"), "heavy": _collect("-m", "heavy")}


def _canary() -> list[str]:
    lines = (REPOSITORY / "parity_tests" / "slow_subset.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_slow_case_at_huge_is_heavy_and_no_other(collected):
    heavy = set(collected["heavy"])
    expected = {nodeid for nodeid in collected["slow"] if any(size in nodeid for size in plugin.HEAVY_SIZES)}
    assert heavy == expected and heavy  # every huge case is heavy, and only slow ones: the default suite has none


def test_the_canary_names_light_slow_cases_one_per_test_function(collected):
    canary = _canary()
    slow, heavy = set(collected["slow"]), set(collected["heavy"])
    assert [nodeid for nodeid in canary if nodeid not in slow] == []  # renamed or gone: keep the list in step
    assert [nodeid for nodeid in canary if nodeid in heavy] == []  # the canary runs two at a time
    functions = {nodeid.partition("[")[0] for nodeid in canary}
    light_functions = {nodeid.partition("[")[0] for nodeid in slow - heavy}
    assert sorted(light_functions - functions) == []
