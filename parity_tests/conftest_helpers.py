"""Small helpers shared by the test modules (kept out of conftest so tests can import them by name)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from convnextv2.converters.torchzip import read_torch_zip


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console entry point as a user would, in a fresh process."""
    full_env = {**os.environ, "CONVNEXTV2_PROGRESS": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "convnextv2.converters", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600,
    )


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b) or set(a) == set(b), f"key sets differ: {set(a) ^ set(b)}"
    for key in a:
        assert a[key].dtype == b[key].dtype, f"{key}: dtype {a[key].dtype} != {b[key].dtype}"
        assert a[key].shape == b[key].shape, f"{key}: shape {a[key].shape} != {b[key].shape}"
        assert np.array_equal(a[key], b[key]), f"{key}: values differ"


def original_state(path: Path) -> dict[str, np.ndarray]:
    return dict(read_torch_zip(path)["model"])
