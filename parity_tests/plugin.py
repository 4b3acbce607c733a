"""pytest options of the parity matrix, registered through the ``pytest11`` entry point so they exist wherever
the toolkit is installed — also for ``pytest --pyargs convnextv2.parity_tests --checkpoint PATH`` run from
site-packages, where no conftest of this repository is on the path.

Options:
  --full-matrix       every size at 224, tiny/base at 384, huge at 512 (default: small sizes at 64 px)
  --checkpoint PATH   also check this checkpoint on every runtime (repeatable; any readable format)
  --artifact FILE     with --checkpoint: also judge this deployment file, made by any tool, against each
                      checkpoint in its own runtime (repeatable); as ``convnextv2 parity --artifact``
  --shard I/N         run only the I-th of N stable slices of the collected tests (CI sharding)
  --parity-report DIR write a JSON/Markdown/JUnit/HTML parity report per --checkpoint into DIR
  --parity-timings FILE  one JSON line per test phase: its duration and, for matrix cases, where the parity
                      run's seconds went (benchmarks/parity_matrix.py reads it)

This module is imported by every pytest run in an environment where the toolkit is installed: it must stay
cheap and import no deep-learning framework.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

MARKERS = {
    "torch": "needs PyTorch (parity group)",
    "tf": "needs TensorFlow/Keras",
    "flax": "needs JAX/Flax",
    "onnx": "needs onnx/onnxruntime",
    "peers": "needs timm/transformers",
    "slow": "long checks (huge model, full matrix)",
    "heavy": "a slow case whose peak memory cannot share a 24 GB machine with another case (set by this plugin on "
             "every slow case at huge); nox -s tests_slow runs them after the rest, one at a time",
    "mmpretrain": "needs OpenMMLab mmpretrain 1.2 (its own site dir); nox -s tests_mmpretrain runs them",
}


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("convnextv2-parity", "ConvNeXt V2 parity matrix")
    group.addoption("--full-matrix", action="store_true", default=False,
                    help="all 8 sizes at 224 px, tiny/base at 384, huge at 512 (default: small sizes at 64 px)")
    group.addoption("--checkpoint", action="append", default=[], metavar="PATH",
                    help="also check this checkpoint (any readable format) on every runtime; repeatable")
    group.addoption("--artifact", action="append", default=[], metavar="FILE",
                    help="with --checkpoint: also judge this deployment file (ONNX, .tflite, OpenVINO .xml, .pte, "
                         ".keras, SavedModel, .pt2) against each checkpoint, in its own runtime; repeatable")
    group.addoption("--shard", default=None, metavar="I/N",
                    help="run only shard I of N (1-based) of the collected tests, split by a stable hash")
    group.addoption("--parity-report", default=None, metavar="DIR",
                    help="with --checkpoint: write .json/.md/.xml/.html parity reports into DIR")
    group.addoption("--parity-timings", default=None, metavar="FILE",
                    help="append one JSON line per test phase (duration; a matrix case's parity timings) to FILE")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise pytest.UsageError(f"--shard {text!r}: expected I/N, e.g. 2/4") from None
    if not sep or n < 1 or not 1 <= i <= n:
        raise pytest.UsageError(f"--shard {text!r}: expected I/N with 1 <= I <= N")
    return i, n


def shard_of(nodeid: str, count: int) -> int:
    """1-based shard of a test: a hash of its id, so every machine and every xdist worker agrees."""
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:8], "big") % count + 1


# The module holding the user-checkpoint cases; with --checkpoint, the only test module collected from this
# package unless others are named on the command line.
CHECKPOINT_TESTS = "test_parity_checkpoint.py"


def pytest_ignore_collect(collection_path: Path, config: Any) -> bool | None:
    """With ``--checkpoint``, collecting this package (``--pyargs convnextv2.parity_tests``, or the repository's
    ``parity_tests/``) collects only the user-checkpoint cases: the rest of the suite needs the repository
    (its docs, every framework) and is not what was asked for. pytest never asks about a file named on the
    command line, so ``nox -s parity -- --checkpoint PATH`` still runs the matrix files it names."""
    if not config.getoption("--checkpoint"):
        return None
    if collection_path.parent != Path(__file__).resolve().parent or collection_path.suffix != ".py":
        return None
    if collection_path.name.startswith("test_") and collection_path.name != CHECKPOINT_TESTS:
        return True
    return None


def pytest_configure(config: Any) -> None:
    path = config.getoption("--parity-timings")
    if path and not hasattr(config, "workerinput"):  # written by the controlling process only
        config.pluginmanager.register(TimingsFile(path), TimingsFile.NAME)
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    parse_shard(config.getoption("--shard"))
    if config.getoption("--artifact") and not config.getoption("--checkpoint"):
        raise pytest.UsageError("--artifact needs --checkpoint: an artifact is judged against a checkpoint")


def _wanted(item: Any, config: Any, shard: tuple[int, int] | None) -> bool:
    # The user-checkpoint tests exist only for a given --checkpoint: deselected (not skipped) otherwise.
    if "user_case" in getattr(item, "fixturenames", ()) and not config.getoption("--checkpoint"):
        return False
    return shard is None or shard_of(item.nodeid, shard[1]) == shard[0]


# mmpretrain lives in a site dir of its own (nox -s tests_mmpretrain, which sets this variable to the pinned
# version): without it, its tests are deselected and counted, not skipped; with the variable set, a missing
# mmpretrain is a failure.
EXPECT_MMPRETRAIN = "CONVNEXTV2_EXPECT_MMPRETRAIN"
MMPRETRAIN = "mmpretrain"
_MMPRETRAIN_DESELECTED = "mmpretrain_deselected"


def _without_mmpretrain() -> bool:
    return not os.environ.get(EXPECT_MMPRETRAIN) and importlib.util.find_spec(MMPRETRAIN) is None


# Any case that builds the huge model (its id names the size) holds 5-17 GB: with `--dist loadgroup` two of them
# never run at once on one CI runner, whichever test file they come from.
HUGE_GROUP = "huge"
# Slow cases at these sizes (the id names the size) peak too high to run beside any other case on a 2-core, 24 GB
# runner: LiteRT's converter alone nears 21 GB at huge, and a huge case beside another one was killed by the
# kernel's OOM killer. They are marked ``heavy``, and ``nox -s tests_slow`` runs them after everything else, each
# alone in a pytest process of its own (noxfile.py). Large peaks at most a few GB: two large cases fit side by side.
HEAVY_SIZES = ("huge",)
HEAVY = "heavy"


def is_heavy(item: Any) -> bool:
    return item.get_closest_marker("slow") is not None and any(size in item.nodeid for size in HEAVY_SIZES)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    shard = parse_shard(config.getoption("--shard"))
    keep: list[Any] = []
    drop: list[Any] = []
    without_mmpretrain = _without_mmpretrain()
    unrun = 0
    for item in items:
        if "huge" in item.nodeid and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(HUGE_GROUP))
        if is_heavy(item) and item.get_closest_marker(HEAVY) is None:
            item.add_marker(getattr(pytest.mark, HEAVY))
        wanted = _wanted(item, config, shard)
        if wanted and without_mmpretrain and item.get_closest_marker(MMPRETRAIN) is not None:
            wanted, unrun = False, unrun + 1
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    config.stash[_UNRUN] = unrun
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller prints the count
        config.workeroutput[_MMPRETRAIN_DESELECTED] = unrun


_UNRUN = pytest.StashKey[int]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist's controller: every worker collects the same tests, so any one's count is the count."""
    count = getattr(node, "workeroutput", {}).get(_MMPRETRAIN_DESELECTED, 0)
    node.config.stash[_UNRUN] = max(node.config.stash.get(_UNRUN, 0), count)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: Any, config: Any) -> None:
    unrun = config.stash.get(_UNRUN, 0)
    if unrun and not hasattr(config, "workeroutput"):
        terminalreporter.write_line(f"{unrun} mmpretrain tests deselected: nox -s tests_mmpretrain runs them (CI does)")


# The framework groups of the matrix (nox -s parity runs one session per group).
PARITY_GROUPS = ("torch", "tf", "flax", "onnx", "peers", "executorch", "openvino", "litert")
# Recorded by the matrix cases (record_property) and written, on the controlling process only, by
# TimingsFile below.
TIMINGS_PROPERTY = "parity_timings"


class TimingsFile:
    """``--parity-timings FILE``: one JSON line per test phase, registered as a plugin of its own on the
    controlling process (it holds the path; no module global)."""

    NAME = "convnextv2-parity-timings"

    def __init__(self, path: str) -> None:
        self.path = path

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when not in ("setup", "call"):
            return
        timings = next((value for key, value in report.user_properties if key == TIMINGS_PROPERTY), None)
        line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "duration": report.duration, "start": getattr(report, "start", None),
                "stop": getattr(report, "stop", None), "groups": sorted(report.keywords.keys() & set(PARITY_GROUPS))}
        if timings is not None:
            line["parity"] = timings
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
