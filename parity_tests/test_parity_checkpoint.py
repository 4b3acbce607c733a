"""Parity of the user's own checkpoints: ``pytest --pyargs convnextv2.parity_tests --checkpoint PATH``.

Each ``--checkpoint`` (any readable format) runs on every runtime, one test per runtime carrying its group
marker, against a float64 PyTorch referee built from the same file. ``--parity-report DIR`` also writes the
JSON, Markdown, JUnit and HTML reports of each run into DIR. Without ``--checkpoint`` the plugin deselects
the test.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest

from convnextv2.parity_tests.test_parity_matrix import RUNTIME_GROUPS


def pytest_generate_tests(metafunc: Any) -> None:
    if "user_case" not in metafunc.fixturenames:
        return
    paths = metafunc.config.getoption("--checkpoint", default=[]) or []
    if not paths:
        # One placeholder case that the plugin deselects: nothing to check without a checkpoint.
        metafunc.parametrize("user_case", [pytest.param(None, id="no-checkpoint")])
        return
    params = [pytest.param((path, runtime), marks=[getattr(pytest.mark, group)], id=f"{Path(path).name}-{runtime}")
              for path in paths for runtime, group in RUNTIME_GROUPS.items()]
    artifacts = metafunc.config.getoption("--artifact", default=[]) or []
    params += [pytest.param((path, ARTIFACT, artifact), id=f"{Path(path).name}-artifact-{Path(artifact).name}")
               for path in paths for artifact in artifacts]
    metafunc.parametrize("user_case", params)


# The second field of a case that judges a deployment file (--artifact) instead of running a runtime.
ARTIFACT = "artifact"


@functools.lru_cache(maxsize=2)
def _checkpoint(path: str) -> Any:
    from convnextv2 import converters

    return converters.load(path)


@functools.lru_cache(maxsize=2)
def _torch(path: str, dtype: str) -> Any:
    from convnextv2 import reference
    from convnextv2.reference.parity_rule import seeded_images

    ckpt = _checkpoint(path)
    images = seeded_images(2, ckpt.preprocessing.input_size, 0)
    return reference.run_features(reference.build(ckpt, "torch", dtype=dtype), "torch", images.astype(dtype))


def test_user_checkpoint(user_case: tuple[str, str], request: pytest.FixtureRequest) -> None:
    from convnextv2.parity_tests.harness import run_parity
    from convnextv2.parity_tests.runtimes import RUNTIMES
    from convnextv2.reference.parity_rule import seeded_images

    path, runtime = user_case[:2]
    ckpt = _checkpoint(path)
    images = seeded_images(2, ckpt.preprocessing.input_size, 0)
    info = {"kind": "random", "batch": 2, "image_size": int(images.shape[-1]), "seed": 0, "directory": None,
            "files": [], "preprocessing": None}
    if runtime == ARTIFACT:
        artifact = user_case[2]
        report = run_parity(ckpt, [], images=images, checkpoint_path=path, inputs_info=info,
                            referee_features=_torch(path, "float64"), artifacts=[artifact])
        _write_reports(report, f"{Path(path).name}-artifact-{Path(artifact).name}", request)
        (result,) = report.artifacts
        assert result.status == "pass", (
            f"{artifact}: {result.status} {result.reason}; first diverges at {result.first_divergence}")
        return
    # A runtime whose framework is not installed here is reported, not failed: a user's environment need not
    # hold every framework (the repository's own matrix fails on it instead).
    missing = RUNTIMES[runtime].availability()
    if missing is not None:
        pytest.skip(f"{runtime} not available: {missing}")
    report = run_parity(ckpt, [runtime], images=images, checkpoint_path=path, inputs_info=info,
                        referee_features=_torch(path, "float64"), baseline_features=_torch(path, "float32"))
    _write_reports(report, f"{Path(path).name}-{runtime}", request)
    result = report.result(runtime)
    assert result.status != "unavailable", result.reason
    assert result.status == "pass", (
        f"{runtime}: {result.status} {result.reason} first diverges at {result.first_divergence}: "
        + "; ".join(f"{f.name} {f.message}" for f in result.features if f.status == "fail"))


def _write_reports(report: Any, name: str, request: pytest.FixtureRequest) -> None:
    from convnextv2.parity_tests.report import write_report

    out_dir = request.config.getoption("--parity-report", default=None)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        for suffix in (".json", ".md", ".xml", ".html"):
            write_report(report, Path(out_dir) / f"{stem}{suffix}", overwrite=True)


def test_with_checkpoint_the_package_collects_only_the_checkpoint_cases():
    """The plugin's collection rule, in process: with --checkpoint every other test module of this package is
    ignored (they need the repository and every framework); without it nothing is."""
    from convnextv2.parity_tests import plugin

    here = Path(plugin.__file__).resolve().parent

    class Config:
        def __init__(self, checkpoints: list[str]) -> None:
            self.checkpoints = checkpoints

        def getoption(self, name: str, default: Any = None) -> Any:
            assert name == "--checkpoint"
            return self.checkpoints

    given, none = Config(["model.safetensors"]), Config([])
    assert plugin.pytest_ignore_collect(here / "test_hostile.py", given) is True
    assert plugin.pytest_ignore_collect(here / "test_parity_matrix.py", given) is True
    assert plugin.pytest_ignore_collect(here / plugin.CHECKPOINT_TESTS, given) is None
    assert plugin.pytest_ignore_collect(here / "harness.py", given) is None
    assert plugin.pytest_ignore_collect(here.parent / "test_elsewhere.py", given) is None
    assert plugin.pytest_ignore_collect(here / "test_hostile.py", none) is None
