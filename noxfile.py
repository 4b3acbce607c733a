"""Developer and CI sessions.

Sessions run in the interpreter nox itself runs under (``.venv/bin/nox`` after the README's install line):
a fresh virtualenv per session would reinstall 4 GB of frameworks for every session.
To use nox's own virtualenvs instead, run ``nox --force-venv-backend venv`` (each session then installs
``-c constraints.txt -e .[all]`` first).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nox
from nox.command import CommandFailed

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = sys.executable
# Framework groups the parity matrix can be sharded by (pytest markers of the same names).
PARITY_GROUPS = ["torch", "tf", "flax", "onnx", "peers", "executorch", "openvino", "litert"]


def _install_if_isolated(session: nox.Session) -> str:
    """Install the project when nox made a virtualenv; return the interpreter to run."""
    if session.venv_backend != "none":
        session.install("-c", "constraints.txt", "-e", ".[all]")
        return "python"
    return PYTHON


def _timed(session: nox.Session, *args: str, env: dict[str, str] | None = None) -> None:
    start = time.perf_counter()
    try:
        session.run(*args, env=env)
    finally:
        session.log(f"wall time: {time.perf_counter() - start:.1f} s")


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The default suite (the README's test command)."""
    python = _install_if_isolated(session)
    _timed(session, python, "-m", "pytest", "-m", "not slow", "-n", "2", "-q", *session.posargs)


@nox.session(venv_backend="none")
def tests_slow(session: nox.Session) -> None:
    """Everything: the default suite, every size (huge included) and the long matrix, in two steps so that no case
    runs out of memory on a 2-core, 24 GB machine.

    1. Every case but the ``heavy`` ones, two at a time (``-n 2``). ``heavy`` is set by parity_tests/plugin.py on
       every slow case at huge: LiteRT's converter alone peaks near 21 GB there, and two huge cases side by side,
       or one beside any other case, were ended by the kernel's OOM killer. Two large cases fit side by side.
    2. The ``heavy`` cases, one at a time, each in a pytest process of its own, so that none inherits what the
       one before left in memory.

    A step that fails does not stop the next: the session runs every case and fails at the end, naming the failed
    steps. nox logs the wall time of each step and the total (docs/benchmarks.md "Slow suite" has the figures).
    """
    python = _install_if_isolated(session)
    started = time.perf_counter()
    failed: list[str] = []

    def step(label: str, *args: str) -> None:
        try:
            _timed(session, python, "-m", "pytest", *args, "-q")
        except CommandFailed:
            failed.append(label)

    step("all but the heavy cases", "-m", "not heavy", "-n", "2", "--dist", "loadgroup", *session.posargs)
    listing = session.run(python, "-m", "pytest", "--collect-only", "-q", "-m", "heavy", *session.posargs,
                          silent=True, success_codes=[0, 5])  # 5: nothing heavy among the selected tests
    heavy = [line.strip() for line in str(listing).splitlines() if "::" in line]
    for index, nodeid in enumerate(heavy, 1):
        session.log(f"heavy case {index}/{len(heavy)}, alone: {nodeid}")
        # The posargs' paths chose the heavy cases already; their options still apply.
        step(nodeid, "-n", "0", nodeid, *[arg for arg in session.posargs if not Path(arg.split("::")[0]).exists()])
    session.log(f"tests_slow wall time: {time.perf_counter() - started:.1f} s in all")
    if failed:
        session.error(f"failed: {'; '.join(failed)}")


def slow_subset() -> list[str]:
    """The node ids of parity_tests/slow_subset.txt: one case of every slow test, the canary CI runs."""
    with open("parity_tests/slow_subset.txt", encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip() and not line.startswith("#")]


@nox.session(venv_backend="none")
def tests_slow_subset(session: nox.Session) -> None:
    """One case of every slow test at its smallest size (what `.ci/run` adds to the default suite)."""
    python = _install_if_isolated(session)
    _timed(session, python, "-m", "pytest", "-n", "2", "-q", *slow_subset(), *session.posargs)


# transformers 5 lives in a site dir of its own that shadows the environment's 4.57.6 (kept for the TF peer)
# on PYTHONPATH; torch and everything else are shared, so the install is a few pure-Python wheels, not a venv.
TRANSFORMERS5_DIR = ".venv-transformers5"
TRANSFORMERS5_PINS = "constraints-transformers5.txt"
# The tests whose subject is transformers itself. Left out of the test_hf_timm.py selection, and run under
# 4.57.6 by the default suite: `.bin` folders (transformers 5 saves safetensors only), the TF classes (gone in
# 5), and the two tests that compare loading info with lists (transformers 5 returns sets).
TRANSFORMERS5_TESTS = [
    "parity_tests/test_transformers5.py",
    "parity_tests/test_hf_timm.py::test_hf_config_labels_and_preprocessor_as_transformers_reads_them",
    "parity_tests/test_hf_timm.py::test_directories_written_by_transformers_read_back_exactly[classifier-safetensors]",
    "parity_tests/test_hf_timm.py::test_directories_written_by_transformers_read_back_exactly[headless-safetensors]",
    "parity_tests/test_hf_timm.py::test_sharded_transformers_directory_is_read",
    "parity_tests/test_hf_timm.py::test_hf_config_with_eps_1e12_is_kept_and_warned",
    "parity_tests/test_hf_timm.py::test_headless_fcmae_encoder_to_hf",
    "parity_tests/test_hub_folders.py::test_save_pretrained_folders_read_back_bit_for_bit",
]


def _pins(path: str) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[name.strip()] = version.strip()
    return pins


def _site_dir_is_current(directory: Path, pins: dict[str, str]) -> bool:
    if not directory.is_dir():
        return False
    present = {p.name.lower() for p in directory.glob("*.dist-info")}
    wanted = {f"{name.replace('-', '_').lower()}-{version}.dist-info" for name, version in pins.items()}
    return wanted <= present and len(present) == len(wanted)


def _site_dir(session: nox.Session, python: str, folder: str, pin_file: str) -> tuple[Path, dict[str, str]]:
    """A site dir of its own for a tool whose pins clash with ours, (re)installed when its pins changed."""
    pins = _pins(pin_file)
    directory = Path(folder).resolve()
    if not _site_dir_is_current(directory, pins):
        shutil.rmtree(directory, ignore_errors=True)  # a stale pin set would leave its extra packages behind
        # --no-deps: pip would otherwise add a second numpy, torch... beside the environment's; the pin file is
        # the complete list (the tests check every requirement is met).
        _timed(session, python, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
               str(directory), "-r", pin_file)
    return directory, pins


@nox.session(venv_backend="none")
def tests_transformers5(session: nox.Session) -> None:
    """The transformers tests again under transformers 5 (constraints-transformers5.txt)."""
    python = _install_if_isolated(session)
    directory, pins = _site_dir(session, python, TRANSFORMERS5_DIR, TRANSFORMERS5_PINS)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")])),
           "CONVNEXTV2_EXPECT_TRANSFORMERS": pins["transformers"], "HF_HUB_OFFLINE": "1"}
    _timed(session, python, "-m", "pytest", "-n", "2", "-q", *TRANSFORMERS5_TESTS, *session.posargs, env=env)


# mmpretrain 1.2 (OpenMMLab) in a site dir of its own, as transformers 5 above: a few pure-Python wheels and
# OpenCV, installed with --no-deps beside the environment's torch. Its tests are deselected elsewhere.
MMPRETRAIN_DIR = ".venv-mmpretrain"
MMPRETRAIN_PINS = "constraints-mmpretrain.txt"


@nox.session(venv_backend="none")
def tests_mmpretrain(session: nox.Session) -> None:
    """The mmpretrain tests against OpenMMLab mmpretrain 1.2 (constraints-mmpretrain.txt)."""
    python = _install_if_isolated(session)
    directory, pins = _site_dir(session, python, MMPRETRAIN_DIR, MMPRETRAIN_PINS)
    # With the expected version set, a missing or other mmpretrain fails the tests instead of deselecting them.
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")])),
           "CONVNEXTV2_EXPECT_MMPRETRAIN": pins["mmpretrain"]}
    # Every test marked mmpretrain, whichever file holds it (test_mmpretrain.py, test_training_checkpoints.py).
    _timed(session, python, "-m", "pytest", "-n", "2", "-q", "-m", "mmpretrain", "parity_tests", *session.posargs,
           env=env)


# The tools of the artifact corpus whose pins clash with ours (onnx2tf: numpy 1.26, onnx 1.19, TensorFlow 2.19;
# litert-torch: typing-extensions, LLM tooling; NNCF: caps on networkx and numpy that would hold ours back), each
# in a site dir of its own, as mmpretrain above. They are never on pytest's path: fixtures/artifact_corpus.py runs
# each as a subprocess with its dir on PYTHONPATH.
ARTIFACT_SITE_DIRS = {"CONVNEXTV2_ONNX2TF_SITE": (".venv-onnx2tf", "constraints-onnx2tf.txt"),
                      "CONVNEXTV2_LITERT_TORCH_SITE": (".venv-litert-torch", "constraints-litert-torch.txt"),
                      "CONVNEXTV2_NNCF_SITE": (".venv-nncf", "constraints-nncf.txt")}


@nox.session(venv_backend="none")
def tests_artifacts(session: nox.Session) -> None:
    """The artifact corpus: deployment files made by the real tools, good and broken, through
    `convnextv2 parity --artifact` (parity_tests/test_artifact_corpus.py, the slow cases included)."""
    python = _install_if_isolated(session)
    env = {"CONVNEXTV2_EXPECT_ARTIFACT_TOOLS": "1"}  # a missing tool fails its cases instead of skipping them
    for variable, (folder, pin_file) in ARTIFACT_SITE_DIRS.items():
        env[variable] = str(_site_dir(session, python, folder, pin_file)[0])
    # One at a time: onnx2tf and ExecuTorch's lowering each take a core and a few GB.
    _timed(session, python, "-m", "pytest", "-q", "parity_tests/test_artifact_corpus.py", *session.posargs,
           env=env)


_SHARED_PARITY_CACHE: list[str] = []


def _shared_parity_cache() -> str:
    """One parity cache for every group and pytest worker of this nox run, removed when nox exits: the ONNX
    graph onnxruntime builds is the one OpenVINO converts, and a size case's exports serve the format and
    precision cases of the same weights (the cache keys by weights, code and framework versions)."""
    if not _SHARED_PARITY_CACHE:
        folder = tempfile.mkdtemp(prefix="convnextv2-nox-parity-")
        atexit.register(shutil.rmtree, folder, True)
        _SHARED_PARITY_CACHE.append(folder)
    return _SHARED_PARITY_CACHE[0]


@nox.session(venv_backend="none")
@nox.parametrize("group", PARITY_GROUPS)
def parity(session: nox.Session, group: str) -> None:
    """The full parity matrix for one framework group (all sizes at 224, tiny/base at 384, huge at 512)."""
    python = _install_if_isolated(session)
    env = {"CONVNEXTV2_TEST_CACHE_HOME": _shared_parity_cache()}
    # The matrix files only (the other suites run under `tests`/`tests_slow`); `nox -s parity -- --checkpoint
    # PATH` adds the user's checkpoint. loadgroup keeps the huge cases on one worker: two at once would not
    # fit in a CI runner's memory.
    _timed(session, python, "-m", "pytest", "parity_tests/test_parity_matrix.py",
           "parity_tests/test_parity_checkpoint.py", "-m", group, "--full-matrix", "-n", "2", "--dist", "loadgroup",
           "-q", *session.posargs, env=env)


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
    # Deployment runtimes (OpenVINO, LiteRT, ExecuTorch) beside the PyTorch reference: docs/benchmarks.md.
    _timed(session, python, "-m", "benchmarks.deploy")
    # Where a single-checkpoint parity run spends its time, cold and warm: docs/benchmarks.md.
    _timed(session, python, "-m", "benchmarks.parity_speed")
    # Where nox -s parity spends its time, group by group (it runs the whole matrix: hours on two cores).
    _timed(session, python, "-m", "benchmarks.parity_matrix")


@nox.session(venv_backend="none")
def fuzz(session: nox.Session) -> None:
    """Coverage-guided and property-based fuzzing of the readers, bounded in time (FUZZ_SECONDS per target)."""
    python = _install_if_isolated(session)
    _timed(session, python, "-m", "tools.fuzz", *session.posargs)
