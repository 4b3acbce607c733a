"""``convnextv2 parity SRC --artifact FILE`` as a user runs it: the artifact's row in every report kind (each read
back with an independent parser: jsonschema, xml.etree, the HTML text), the exit codes (0 pass, 1 a failing or
unrunnable artifact, 2 an unreadable one) and the pytest plugin's ``--artifact``. The graphs are written by
``torch.onnx.export`` itself from PyTorch modules, not by this toolkit's exporter; the corpus of other tools'
artifacts is parity_tests/test_artifact_corpus.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from convnextv2.fixtures import write_fixture
from convnextv2.parity_tests.conftest_helpers import run_cli
from convnextv2.parity_tests.report import load_schema

pytestmark = [pytest.mark.torch, pytest.mark.onnx]
CONFIG = "custom:depths=1,1,2,1;dims=8,16,32,64"
SIZE = 224  # the checkpoint's own input size: the graphs are static in it, as exporters write them


def _torch_onnx(ckpt_path: Path, target: Path, *, legacy_batch: bool = False) -> Path:
    """The checkpoint's PyTorch module exported by torch.onnx as a user would (dynamic batch, one output).
    ``legacy_batch``: the batch made dynamic with the older ``dynamic_axes`` argument, with which torch 2.13's
    exporter declares a dynamic batch but bakes batch 1 into a Reshape."""
    import torch

    from convnextv2 import converters, reference

    model = reference.build(converters.load(ckpt_path), "torch")
    example = torch.zeros(1, 3, SIZE, SIZE)
    dynamic = ({"dynamic_axes": {"image": {0: "n"}, "scores": {0: "n"}}} if legacy_batch else
               {"dynamic_shapes": ({0: torch.export.Dim("n", min=1, max=64)},)})
    torch.onnx.export(model, (example,), str(target), input_names=["image"], output_names=["scores"], **dynamic)
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity-artifacts")
    source, other = folder / "model.pt", folder / "other.pt"
    write_fixture(source, CONFIG, "original", seed=4)
    write_fixture(other, CONFIG, "original", seed=5)
    return {"source": source, "good": _torch_onnx(source, folder / "good.onnx"),
            "other": _torch_onnx(other, folder / "other-weights.onnx")}


def _parity(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("parity", *args, "--batch", "4", "--no-cache")


def test_a_good_artifact_is_one_row_of_every_report(files, tmp_path):
    reports = [tmp_path / f"parity.{ext}" for ext in ("json", "md", "xml", "html")]
    done = _parity(str(files["source"]), "--runtimes", "torch", "--artifact", str(files["good"]),
                   *[arg for path in reports for arg in ("--report", str(path))])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "good.onnx" in done.stdout and "PASS" in done.stdout

    data = json.loads(reports[0].read_text())
    jsonschema.validate(data, load_schema())
    assert [(r["name"], r["kind"]) for r in data["runtimes"]] == [("torch", "runtime"), ("good.onnx", "artifact")]
    (entry,) = data["artifacts"]
    assert entry["status"] == "pass" and entry["format"] == "onnx" and entry["precision"] == "float32"
    assert entry["path"].endswith("good.onnx") and entry["runtime"].startswith("onnxruntime")
    assert entry["first_divergence"] is None and entry["metrics"] is None
    # The graph says NCHW, a dynamic batch, the size and 10 classes; what it takes (normalised or raw pixels)
    # it does not say, so every candidate was tried and named.
    conventions = entry["conventions"]
    assert conventions["layout"] == {"value": "NCHW", "how": "signature"}
    assert conventions["image_size"]["value"] == SIZE
    assert conventions["input_range"]["value"] == "normalized"
    assert {c["value"] for c in conventions["input_range"]["candidates"]} == {"normalized", "unit", "byte"}
    row = data["runtimes"][1]
    assert row["status"] == "pass" and {f["name"] for f in row["features"]} >= {"logits"}

    assert "good.onnx" in reports[1].read_text() and "conventions:" in reports[1].read_text()
    suites = {s.get("name"): s for s in ET.parse(reports[2]).getroot().findall("testsuite")}
    assert suites["parity.good.onnx"].get("failures") == "0"
    assert "input_range normalized" in suites["parity.good.onnx"].findtext("system-out")
    assert "good.onnx" in reports[3].read_text()


def test_an_artifact_of_other_weights_fails_at_the_stem_with_exit_1(files, tmp_path):
    report = tmp_path / "parity.xml"
    done = _parity(str(files["source"]), "--runtimes", "none", "--artifact", str(files["other"]), "--json",
                   "--report", str(report))
    assert done.returncode == 1, done.stdout + done.stderr
    data = json.loads(done.stdout)
    jsonschema.validate(data, load_schema())
    (entry,) = data["artifacts"]
    assert entry["status"] == "fail" and entry["first_divergence"]["feature"] == "stem"
    assert "other-weights.onnx" in done.stderr.splitlines()[-1]
    suite = ET.parse(report).getroot().find("testsuite")
    assert int(suite.get("failures")) >= 1


def test_artifacts_alone_and_together(files):
    done = _parity(str(files["source"]), "--runtimes", "none", "--artifact", str(files["good"]), "--artifact",
                   str(files["other"]), "--json")
    assert done.returncode == 1
    statuses = {Path(a["path"]).name: a["status"] for a in json.loads(done.stdout)["artifacts"]}
    assert statuses == {"good.onnx": "pass", "other-weights.onnx": "fail"}


def test_a_declared_dynamic_batch_that_fails_runs_one_image_at_a_time(files, tmp_path):
    graph = _torch_onnx(files["source"], tmp_path / "legacy-batch.onnx", legacy_batch=True)
    done = _parity(str(files["source"]), "--runtimes", "none", "--artifact", str(graph), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    batch = json.loads(done.stdout)["artifacts"][0]["conventions"]["batch"]
    assert batch["value"] == 1 and batch["how"] == "tried"
    assert "declared dynamic, but a batch of 4 fails" in batch["note"] and "Reshape" in batch["note"]


def test_an_unreadable_artifact_is_bad_input_named_in_one_line(files, tmp_path):
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(files["good"].read_bytes()[:5000])
    done = _parity(str(files["source"]), "--runtimes", "none", "--artifact", str(truncated))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(truncated) in lines[0] and "Traceback" not in done.stderr

    missing = _parity(str(files["source"]), "--runtimes", "none", "--artifact", str(tmp_path / "absent.onnx"))
    assert missing.returncode == 2 and "absent.onnx" in missing.stderr


def test_nothing_to_compare_is_bad_input(files):
    done = _parity(str(files["source"]), "--runtimes", "none")
    assert done.returncode == 2 and "--artifact" in done.stderr


def test_the_pytest_plugin_takes_artifacts(files, tmp_path):
    """``pytest --pyargs convnextv2.parity_tests --checkpoint X --artifact Y``, as from site-packages: one case per
    artifact, failing on the other weights."""
    env = {**os.environ, "CONVNEXTV2_PROGRESS": "0"}
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "convnextv2.parity_tests",
            "--checkpoint", str(files["source"]), "-k", "artifact", "--parity-report", str(tmp_path / "reports")]
    good = subprocess.run([*base, "--artifact", str(files["good"])], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert good.returncode == 0, good.stdout[-3000:]
    assert "1 passed" in good.stdout
    assert list((tmp_path / "reports").glob("*artifact-good.onnx.json"))
    bad = subprocess.run([*base, "--artifact", str(files["other"])], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert bad.returncode == 1 and "first diverges at stem" in bad.stdout

    alone = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs",
                            "convnextv2.parity_tests", "--artifact", str(files["good"])],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert alone.returncode == 4 and "--artifact needs --checkpoint" in alone.stdout + alone.stderr
