"""``convnextv2 parity`` as a user runs it: exit codes, the terminal table and every report kind, each read
back with an independent parser (jsonschema, xml.etree, Pillow)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from convnextv2.fixtures import write_fixture
from convnextv2.parity_tests.conftest_helpers import run_cli
from convnextv2.parity_tests.report import load_schema

pytestmark = pytest.mark.torch
CONFIG = "custom:depths=1,1,2,1;dims=8,16,32,64"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity-cli") / "model.pt"
    write_fixture(path, CONFIG, "original", seed=4)
    return path


def _junit_counts(path):
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    cases = root.findall("./testsuite/testcase")
    return root, cases


@pytest.mark.peers
def test_reports_of_every_kind(checkpoint, tmp_path):
    reports = [tmp_path / f"parity.{ext}" for ext in ("json", "md", "xml", "html", "png")]
    args = ["parity", str(checkpoint), "--runtimes", "torch", "--peers", "timm", "--image-size", "64"]
    for path in reports:
        args += ["--report", str(path)]
    done = run_cli(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout and "timm" in done.stdout and "stage4" in done.stdout

    data = json.loads(reports[0].read_text())
    jsonschema.validate(data, load_schema())
    assert data["passed"] is True and data["exit_code"] == 0
    assert [r["name"] for r in data["runtimes"]] == ["torch", "timm"]
    timm = data["runtimes"][1]
    assert [f["name"] for f in timm["features"]] == ["stem", "stage1", "stage2", "stage3", "stage4", "pooled",
                                                     "logits"]
    assert all(f["status"] == "pass" and f["scale_aware_error"] <= f["tolerance_scale_aware"]
               for f in timm["features"])

    root, cases = _junit_counts(reports[2])
    assert int(root.get("tests")) == len(cases) == 14 and root.get("failures") == "0"
    assert {c.get("classname") for c in cases} == {"parity.torch", "parity.timm"}

    markdown = reports[1].read_text()
    assert "| runtime | verdict | stem |" in markdown and "| timm | pass |" in markdown
    page = reports[3].read_text()
    assert "<svg" in page and "<polyline" in page and "timm" in page
    from PIL import Image

    with Image.open(reports[4]) as image:
        assert image.format == "PNG" and image.size == (760, 360)
        # A chart, not a blank canvas: several colours drawn.
        assert len(image.convert("RGB").getcolors(maxcolors=100000)) > 5


def test_impossible_tolerance_fails_with_exit_1(checkpoint, tmp_path):
    report = tmp_path / "strict.json"
    junit = tmp_path / "strict.xml"
    done = run_cli("parity", str(checkpoint), "--runtimes", "torch", "--image-size", "64", "--atol", "1e-12",
                   "--rtol", "0", "--report", str(report), "--report", str(junit))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "parity failed: torch (fail, first diverges at stem)" in done.stderr
    data = json.loads(report.read_text())
    jsonschema.validate(data, load_schema())
    assert data["passed"] is False and data["exit_code"] == 1
    assert data["tolerance"]["float32"]["rule"] == "explicit"
    assert data["runtimes"][0]["first_divergence"] == "stem"
    root, cases = _junit_counts(junit)
    assert int(root.get("failures")) == len([c for c in cases if c.find("failure") is not None]) == 7
    # The schema is not vacuous: a report with an unknown status is rejected.
    data["runtimes"][0]["status"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, load_schema())


@pytest.mark.parametrize("extra, message", [
    (["--runtimes", "caffe"], "unknown caffe"),
    (["--report", "out.txt"], "unknown extension"),
    (["--atol", "tight"], "expected a number"),
    (["--image-size", "50"], "multiple of 32"),
    (["--images", "no-such-dir"], "not a directory"),
    (["--runtimes", "none"], "nothing to compare"),
    (["--batch", "0"], "at least 1"),
])
def test_usage_errors_exit_2(checkpoint, tmp_path, monkeypatch, extra, message):
    from convnextv2.converters.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["parity", str(checkpoint), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_missing_checkpoint_exits_2(tmp_path):
    done = run_cli("parity", str(tmp_path / "nothing.pt"), "--runtimes", "torch")
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_runtime_asked_for_but_not_installed_exits_2(checkpoint, monkeypatch):
    from convnextv2.converters.cli import main
    from convnextv2.parity_tests import runtimes

    ghost = runtimes.Runtime("ghost", "runtime", "needs a framework that is not installed", lambda *a: {},
                             requires=("convnextv2_ghost_framework",), extra="tf")
    # Only torch and the ghost registered: the default "every runtime" then stays cheap.
    monkeypatch.setattr(runtimes, "RUNTIMES", {"torch": runtimes.RUNTIMES["torch"], "ghost": ghost})
    result = CliRunner().invoke(main, ["parity", str(checkpoint), "--runtimes", "torch,ghost"])
    assert result.exit_code == 2
    assert "runtime ghost is not available: convnextv2_ghost_framework is not installed" in result.output
    # Not asked for by name: it is listed as not available and the others still run.
    result = CliRunner().invoke(main, ["parity", str(checkpoint), "--image-size", "64", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    ghost_row = next(r for r in data["runtimes"] if r["name"] == "ghost")
    assert ghost_row["status"] == "unavailable" and "not installed" in ghost_row["reason"]


def test_images_directory(checkpoint, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    for index in range(2):
        Image.fromarray((rng.random((70 + index * 30, 90, 3)) * 255).astype(np.uint8)).save(images / f"{index}.png")
    np.save(images / "2.npy", (rng.random((64, 80, 3)) * 255).astype(np.uint8))
    (images / "notes.txt").write_text("not an image")
    report = tmp_path / "r.json"
    done = run_cli("parity", str(checkpoint), "--runtimes", "torch", "--images", str(images), "--image-size", "64",
                   "--report", str(report))
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["inputs"]["kind"] == "files" and data["inputs"]["files"] == ["0.png", "1.png", "2.npy"]
    assert data["inputs"]["batch"] == 3 and data["runtimes"][0]["features"][0]["shape"][0] == 3


def test_gpu_check_without_a_gpu_says_so_and_exits_2():
    """The GPU parity check is run by hand on a GPU machine; on one without CUDA (CI) it refuses plainly."""
    import torch

    # tools/ is not installed: it runs as `python -m tools.gpu_check` from the repository root.
    root = Path(__file__).resolve().parents[1]
    if not (root / "tools" / "gpu_check.py").is_file():
        # `pytest --pyargs convnextv2.parity_tests` from site-packages: there is no repository root to run it from.
        pytest.skip("tools/ exists only in a source checkout")
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--variants", "atto"],
                          capture_output=True, text=True, timeout=600, cwd=root)
    if torch.cuda.is_available():
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        assert done.returncode == 2 and "needs a GPU" in done.stderr


def test_runtime_aliases_come_from_the_runner_records():
    from convnextv2.converters.cli.parity import _split
    from convnextv2.converters.runners import registry

    assert _split(("TF, ort", "hf,jax", "pytorch", "keras,onnx,transformers,hf-tf")) == [
        "tensorflow", "onnxruntime", "transformers-pt", "flax", "torch", "transformers-tf"]
    for alias in ("tf", "keras", "jax", "onnx", "ort", "pytorch", "hf", "transformers", "hf-tf"):
        assert registry.get(alias).name == _split((alias,))[0]
