"""Whichever transformers is installed (4.57.6 in .venv; 5.x in `nox -s tests_transformers5`, which puts
.venv-transformers5 first on PYTHONPATH): our HF folders load in it with no missing or unexpected keys, what it
saves reads back bit for bit, the transformers-pt peer passes parity, and a peer that cannot run is reported
as the runtimes are: "not available" with the reason under ``--peers all``, a usage error (exit 2) by name.

Peers are hidden for real: the CLI runs in a fresh interpreter whose import system refuses the module, as if it
were not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.numpy
import torch
from click.testing import CliRunner

from convnextv2 import converters, fixtures
from convnextv2.converters import hf as hf_format
from convnextv2.converters.runners.peers import import_transformers
from convnextv2.parity_tests import runtimes
from convnextv2.parity_tests.conftest_helpers import assert_same_tensors

pytestmark = [pytest.mark.peers, pytest.mark.torch]

REPO = Path(__file__).resolve().parents[1]
# Set by `nox -s tests_transformers5` to the version pinned in constraints-transformers5.txt: a broken
# PYTHONPATH would otherwise test the 4.x in .venv again and pass.
EXPECT_ENV = "CONVNEXTV2_EXPECT_TRANSFORMERS"


def _major(version: str) -> int:
    return int(version.split(".", 1)[0])


def _pin(path: Path, package: str) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.split("#", 1)[0].strip()
    raise AssertionError(f"{path}: no pin for {package}")


@pytest.fixture(scope="module")
def transformers():
    return import_transformers()


# ------------------------------------------------------------ the environment under test

def test_the_transformers_imported_is_the_one_installed(transformers):
    installed = importlib.metadata.version("transformers")
    assert transformers.__version__ == installed, (
        f"import transformers gives {transformers.__version__} from {transformers.__file__}, but the first "
        f"installed distribution on sys.path is {installed}")
    expected = os.environ.get(EXPECT_ENV)
    if expected:
        assert installed == expected, f"{EXPECT_ENV}={expected}, but transformers {installed} is installed"
    # The second site dir must not bring its own torch: any other build than the pinned CPU one is wrong here.
    assert torch.__version__.split("+")[0] == _pin(REPO / "constraints.txt", "torch")


def test_every_requirement_of_transformers_is_met():
    """The transformers 5 site dir is installed with --no-deps: prove its list is complete (pip would have)."""
    from packaging.requirements import Requirement

    problems: list[str] = []
    seen: set[str] = set()
    pending = ["transformers"]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                version = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{name} needs {requirement}: not installed")
                continue
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{name} needs {requirement}: {version} installed")
            pending.append(requirement.name)
    assert not problems, "; ".join(problems)


def test_the_installed_transformers_is_accepted_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_format.check_transformers_version()


# ------------------------------------------------------------ our folders in transformers, and back

@pytest.mark.parametrize("layout", ["original", "fcmae"], ids=["classifier", "headless"])
def test_our_folder_loads_exactly_and_what_transformers_saves_reads_back_bit_for_bit(tmp_path, transformers,
                                                                                      layout):
    src = tmp_path / "src.pt"
    fixtures.write_fixture(src, "atto", layout, seed=3)
    ckpt = converters.load(src)
    ours = tmp_path / "ours"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the headless encoder's placeholder norm, tested elsewhere
        converters.save(ckpt, ours, format="hf")
    headless = layout == "fcmae"
    cls = transformers.ConvNextV2Model if headless else transformers.ConvNextV2ForImageClassification
    model, info = cls.from_pretrained(ours, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], f"transformers {transformers.__version__} loading {ours}: {kind} {info[kind]}"
    # Loaded without complaint is not loaded unchanged: every parameter is the file's, bit for bit.
    written = safetensors.numpy.load_file(ours / "model.safetensors")
    assert_same_tensors({k: v.numpy() for k, v in model.state_dict().items()}, written)

    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert_same_tensors(safetensors.numpy.load_file(saved / "model.safetensors"), written)
    back = converters.load(saved)
    assert back.config.num_classes == ckpt.config.num_classes
    assert back.config.dims == ckpt.config.dims and back.config.depths == ckpt.config.depths
    # transformers keeps our config's eps; the headless folder's unit final norm is a real norm to a reader
    # without our metadata, the rest are the source's tensors.
    assert back.config.head_norm_eps == json.loads((ours / "config.json").read_text())["layer_norm_eps"]
    expected = dict(ckpt.model_tensors())
    got = dict(back.model_tensors())
    if headless:
        assert set(got) - set(expected) == {"head.norm.weight", "head.norm.bias"}
        got = {k: v for k, v in got.items() if k in expected}
    assert_same_tensors({k: v for k, v in got.items()}, {k: v for k, v in expected.items()})


# ------------------------------------------------------------ transformers-tf follows the installed version

def test_transformers_tf_is_not_available_exactly_when_transformers_has_no_tf_classes(tmp_path, transformers):
    version = importlib.metadata.version("transformers")
    # Independent of the blocker: does this transformers ship the TF ConvNeXt V2 module at all?
    ships_tf = importlib.util.find_spec("transformers.models.convnextv2.modeling_tf_convnextv2") is not None
    assert ships_tf == (_major(version) < 5)
    reason = runtimes.get("transformers-tf").availability()
    if ships_tf:
        assert reason is None or "has no TensorFlow classes" not in reason
        return
    assert reason is not None and f"transformers {version} has no TensorFlow classes" in reason
    src = tmp_path / "atto.pt"
    fixtures.write_fixture(src, "atto", "original", seed=0)
    # By name: a usage error before any model runs, naming why.
    result = CliRunner().invoke(_cli(), ["parity", str(src), "--runtimes", "torch", "--peers", "transformers-tf"])
    assert result.exit_code == 2, result.output
    assert f"peer transformers-tf is not available: {reason}" in result.output


def _cli():
    from convnextv2.converters.cli import main

    return main


# ------------------------------------------------------------ --peers with a peer genuinely missing

# The real command line in a fresh interpreter where the named top-level modules are blocked the way Python
# itself documents: None in sys.modules makes ``import`` raise ModuleNotFoundError and ``find_spec`` answer None,
# exactly what a package that is not installed gives to us and to transformers' own availability checks.
HIDING_CLI = """
import runpy, sys

for name in sys.argv[1].split(","):
    sys.modules[name] = None
sys.argv = ["convnextv2", *sys.argv[2:]]
runpy.run_module("convnextv2.converters", run_name="__main__")
"""


def run_cli_hiding(hidden: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONVNEXTV2_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", HIDING_CLI, ",".join(hidden), *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def atto(tmp_path_factory):
    path = tmp_path_factory.mktemp("peers-atto") / "atto.pt"
    fixtures.write_fixture(path, "atto", "original", seed=1)
    return path


def test_peers_all_lists_missing_peers_as_not_available_and_runs_the_rest(atto, tmp_path):
    # timm hidden; tf_keras hidden too so that on 4.x the TF peer is missing for a plain reason (and no
    # TensorFlow process is paid for); on 5.x the version is the reason, whatever is installed.
    report = tmp_path / "parity.json"
    done = run_cli_hiding(["timm", "tf_keras"], "parity", str(atto), "--runtimes", "torch", "--peers", "all",
                          "--image-size", "64", "--batch", "2", "--report", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["name"]: r for r in json.loads(report.read_text())["runtimes"]}
    assert list(rows) == ["torch", "timm", "transformers-pt", "transformers-tf"]
    assert rows["timm"]["status"] == "unavailable"
    assert rows["timm"]["reason"] == ("runtime timm is not available: timm is not installed; install it with: "
                                      "pip install 'convnextv2-toolkit[peers]'")
    version = importlib.metadata.version("transformers")
    tf_reason = (f"transformers {version} has no TensorFlow classes" if _major(version) >= 5
                 else "tf_keras is not installed")
    assert rows["transformers-tf"]["status"] == "unavailable" and tf_reason in rows["transformers-tf"]["reason"]
    # The peer that can run does, and passes on every feature it exposes.
    hf = rows["transformers-pt"]
    assert hf["status"] == "pass", hf
    assert [f["name"] for f in hf["features"]] == ["stem", "stage1", "stage2", "stage3", "stage4", "pooled", "logits"]
    assert all(f["status"] == "pass" for f in hf["features"]), hf["features"]
    # The terminal table says the same.
    for name in ("timm", "transformers-tf"):
        assert re.search(rf"{re.escape(name)}\b.*not available", done.stdout), done.stdout


@pytest.mark.parametrize("peers", ["timm", "timm,transformers-pt"])
def test_a_missing_peer_asked_for_by_name_is_a_usage_error(atto, peers):
    done = run_cli_hiding(["timm"], "parity", str(atto), "--runtimes", "torch", "--peers", peers)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "peer timm is not available: timm is not installed" in done.stderr
    assert "Traceback" not in done.stderr
