"""Developer and CI sessions.

Sessions run in the interpreter nox itself runs under (``.venv/bin/nox`` after the README's install line):
a fresh virtualenv per session would reinstall 4 GB of frameworks for every session.
To use nox's own virtualenvs instead, run ``nox --force-venv-backend venv`` (each session then installs
``-c constraints.txt -e .[all]`` first).
"""

from __future__ import annotations

import sys
import time

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = sys.executable
# Framework groups the parity matrix can be sharded by (pytest markers of the same names).
PARITY_GROUPS = ["torch", "tf", "flax", "onnx", "peers"]


def _install_if_isolated(session: nox.Session) -> str:
    """Install the project when nox made a virtualenv; return the interpreter to run."""
    if session.venv_backend != "none":
        session.install("-c", "constraints.txt", "-e", ".[all]")
        return "python"
    return PYTHON


def _timed(session: nox.Session, *args: str) -> None:
    start = time.perf_counter()
    try:
        session.run(*args)
    finally:
        session.log(f"wall time: {time.perf_counter() - start:.1f} s")


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The default suite (the README's test command)."""
    python = _install_if_isolated(session)
    _timed(session, python, "-m", "pytest", "-m", "not slow", "-n", "2", "-q", *session.posargs)


@nox.session(venv_backend="none")
def tests_slow(session: nox.Session) -> None:
    """Everything, including the large sizes (huge) and the long matrix."""
    python = _install_if_isolated(session)
    # loadgroup: the huge cases share one worker (two at once exceed a 24 GB runner).
    _timed(session, python, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q", *session.posargs)


def slow_subset() -> list[str]:
    """The node ids of parity_tests/slow_subset.txt: one case of every slow test, the canary CI runs."""
    with open("parity_tests/slow_subset.txt", encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip() and not line.startswith("#")]


@nox.session(venv_backend="none")
def tests_slow_subset(session: nox.Session) -> None:
    """One case of every slow test at its smallest size (what `.ci/run` adds to the default suite)."""
    python = _install_if_isolated(session)
    _timed(session, python, "-m", "pytest", "-n", "2", "-q", *slow_subset(), *session.posargs)


@nox.session(venv_backend="none")
@nox.parametrize("group", PARITY_GROUPS)
def parity(session: nox.Session, group: str) -> None:
    """The full parity matrix for one framework group (all sizes at 224, tiny/base at 384, huge at 512)."""
    python = _install_if_isolated(session)
    # The matrix files only (the other suites run under `tests`/`tests_slow`); `nox -s parity -- --checkpoint
    # PATH` adds the user's checkpoint. loadgroup keeps the huge cases on one worker: two at once would not
    # fit in a CI runner's memory.
    _timed(session, python, "-m", "pytest", "parity_tests/test_parity_matrix.py",
           "parity_tests/test_parity_checkpoint.py", "-m", group, "--full-matrix", "-n", "2", "--dist", "loadgroup",
           "-q", *session.posargs)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    python = _install_if_isolated(session)
    session.run(python, "-m", "ruff", "check", ".")


@nox.session(venv_backend="none")
def typecheck(session: nox.Session) -> None:
    python = _install_if_isolated(session)
    session.run(python, "-m", "mypy", "reference", "converters", "fixtures", "parity_tests", "tools")


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Benchmarks: writes bench-results/bench.md and bench-results/bench.json."""
    python = _install_if_isolated(session)
    _timed(session, python, "-m", "benchmarks", *session.posargs)


@nox.session(venv_backend="none")
def fuzz(session: nox.Session) -> None:
    """Coverage-guided and property-based fuzzing of the readers, bounded in time (FUZZ_SECONDS per target)."""
    python = _install_if_isolated(session)
    _timed(session, python, "-m", "tools.fuzz", *session.posargs)
