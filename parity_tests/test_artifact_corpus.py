"""``convnextv2 parity SRC --runtimes none --artifact FILE --json`` on deployment files made by the real tools.

The artifacts are built here, offline, by the tools users run (``convnextv2.fixtures.artifact_corpus``): torch.onnx,
optimum, onnxconverter-common, OpenVINO (with and without its float16 weight compression), onnx2tf (float32 /
float16 NHWC and its default Flex build), TensorFlow's TFLiteConverter, litert-torch, ExecuTorch, onnxruntime's
quantizers, torch.export and Keras; and broken ones made by the same tools from deliberately wrong timm modules
(``convnextv2.fixtures.artifact_models``). The oracle of "good" is the tool itself run on the checkpoint's own
model; of "broken", a patch whose place in the network is known. Every good artifact must pass at the precision it
was built in; every broken one must fail and name the feature where it first diverges.

The default run builds one cheap canary (torch.onnx, good and broken); the corpus is slow (``nox -s
tests_artifacts`` installs onnx2tf and litert-torch in site dirs of their own and runs it). Everything at atto.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from convnextv2.converters.cli import main
from convnextv2.converters.peer_imports import import_torchvision_guarded
from convnextv2.fixtures import artifact_corpus as corpus
from convnextv2.fixtures import artifact_models as models
from convnextv2.reference.errors import MissingDependencyError

pytestmark = [pytest.mark.torch, pytest.mark.peers, pytest.mark.onnx]

# Set by nox -s tests_artifacts: there a missing site-dir tool fails the case instead of skipping it.
EXPECT_TOOLS = "CONVNEXTV2_EXPECT_ARTIFACT_TOOLS"
FLOAT16_MAX = 65504.0


def _parity(source: corpus.Source, *artifacts: Path) -> tuple[int, dict[str, Any], str]:
    """The command a user types; its exit code, JSON report and stderr."""
    args = ["parity", str(source.path), "--runtimes", "none", "--image-size", str(source.size), "--batch", "4",
            "--no-cache", "--json"]
    for path in artifacts:
        args += ["--artifact", str(path)]
    result = CliRunner().invoke(main, args, env={"CONVNEXTV2_PROGRESS": "0"})
    data = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    return result.exit_code, data, result.stderr


def _entry(data: dict[str, Any], path: Path) -> dict[str, Any]:
    entries = [a for a in data.get("artifacts", []) if Path(a["path"]) == path]
    assert len(entries) == 1, f"{path.name}: not one entry in the report's artifacts: {data.get('artifacts')}"
    return entries[0]


def _assert_passes(entry: dict[str, Any], precision: str) -> None:
    name = Path(entry["path"]).name
    assert entry["status"] == "pass", f"{name}: {entry['status']}: {entry.get('reason')}"
    assert entry["precision"] == precision, f"{name}: judged at {entry['precision']} ({entry['precision_how']})"
    assert entry["first_divergence"] is None, entry["first_divergence"]
    if precision == "int8":
        assert entry["metrics"], f"{name}: an int8 artifact is judged by the quantization rule, with its metrics"


def _assert_fails_at(entry: dict[str, Any], feature: str) -> None:
    name = Path(entry["path"]).name
    assert entry["status"] == "fail", f"{name}: {entry['status']}: {entry.get('reason')}"
    divergence = entry["first_divergence"]
    assert divergence and divergence["feature"] == feature, (
        f"{name}: first divergence {divergence}, expected at {feature}; localisation {entry.get('localisation')}")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> corpus.Source:
    import_torchvision_guarded()
    return corpus.make_source(tmp_path_factory.mktemp("artifact-source"))


# --------------------------------------------------------------------------------- the default run's canary


def test_canary_torch_onnx_good_and_broken(source, tmp_path):
    """torch.onnx of timm's module passes at float32; the same export with tanh GELU in stage 2 fails there."""
    good = corpus.make_torch_onnx(tmp_path, source)
    broken = corpus.make_broken(tmp_path, source, "tanh_gelu")
    code, data, stderr = _parity(source, good, broken)
    assert code == 1, stderr
    _assert_passes(_entry(data, good), "float32")
    _assert_fails_at(_entry(data, broken), models.BROKEN["tanh_gelu"])


def test_truncated_artifact_exits_2_naming_the_file(source, tmp_path):
    good = corpus.make_torch_onnx(tmp_path, source)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    code, _, stderr = _parity(source, truncated)
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error")]
    assert code == 2, stderr
    assert len(lines) == 1 and "truncated.onnx" in lines[0], stderr
    assert "Traceback" not in stderr


# ------------------------------------------------------------------------------------------- the corpus


def _site_tool(tool: str) -> None:
    """A tool that lives in its own site dir: skipped where it is not installed, unless nox asked for it."""
    try:
        corpus.site_dir(tool)
    except MissingDependencyError as exc:
        if os.environ.get(EXPECT_TOOLS):
            raise
        pytest.skip(f"{exc} (nox -s tests_artifacts installs it)")


def _static_onnx(folder: Path, source: corpus.Source) -> Path:
    return corpus.make_torch_onnx(folder, source, name="torch_onnx_b1", dynamic_batch=False)


def _onnx2tf(mode: str) -> Callable[[Path, corpus.Source], Path]:
    def make(folder: Path, source: corpus.Source) -> Path:
        _site_tool("onnx2tf")
        return corpus.make_onnx2tf(folder, _static_onnx(folder, source), mode)

    return make


def _litert_torch(folder: Path, source: corpus.Source) -> Path:
    _site_tool("litert_torch")
    return corpus.make_litert_torch(folder, source)


def _nncf(recipe: str) -> Callable[[Path, corpus.Source], Path]:
    def make(folder: Path, source: corpus.Source) -> Path:
        _site_tool("nncf")
        return corpus.make_nncf_int8(folder, source, recipe)

    return make


# case -> (maker, the precision it passes at | ("fail", feature) | ("unavailable", words in the reason))
GOOD: dict[str, tuple[Callable[[Path, corpus.Source], Path], str]] = {
    "torch_onnx": (corpus.make_torch_onnx, "float32"),
    "optimum": (corpus.make_optimum_onnx, "float32"),
    "onnxconverter_float16": (lambda f, s: corpus.make_onnx_float16(f, _static_onnx(f, s)), "float16"),
    "openvino_compressed": (lambda f, s: corpus.make_openvino(f, s, compress_to_fp16=True), "float16"),
    "openvino_float32": (lambda f, s: corpus.make_openvino(f, s, compress_to_fp16=False), "float32"),
    "onnx2tf_float32": (_onnx2tf("float32"), "float32"),
    "onnx2tf_float16": (_onnx2tf("float16"), "float16"),
    "tf_converter": (corpus.make_tflite_from_keras, "float32"),
    "litert_torch": (_litert_torch, "float32"),
    "executorch": (corpus.make_executorch, "float32"),
    "torch_export": (corpus.make_torch_export, "float32"),
    "torch_export_float16": (corpus.make_torch_export_float16, "float16"),
    "keras": (corpus.make_keras, "float32"),
    "onnxruntime_qdq": (lambda f, s: corpus.make_onnx_qdq(f, _static_onnx(f, s), s), "int8"),
    "onnxruntime_dynamic": (lambda f, s: corpus.make_onnx_dynamic_quant(f, _static_onnx(f, s)), "int8"),
    # NNCF's defaults (corpus.make_nncf_int8 "defaults") are no broken case: they pass on this source.
    "nncf_int8_transformer": (_nncf("transformer"), "int8"),
}

BROKEN: dict[str, tuple[Callable[[Path, corpus.Source], Path], str]] = {
    **{f"torch_onnx_{name}": (lambda f, s, name=name: corpus.make_broken(f, s, name), feature)
       for name, feature in models.BROKEN.items()},
    "openvino_no_grn": (lambda f, s: corpus.make_broken(f, s, "no_grn", tool="openvino"), models.BROKEN["no_grn"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [*GOOD, *BROKEN, "onnx2tf_flex", "grn_overflow_float16"])
def test_corpus(source, tmp_path, case):
    """Each artifact alone through the command line: a good one passes at its own precision, a broken one fails
    at the feature its patch changed, onnx2tf's default build is unavailable (FlexErf), never a pass."""
    if case in GOOD:
        maker, precision = GOOD[case]
        artifact = maker(tmp_path, source)
        code, data, stderr = _parity(source, artifact)
        _assert_passes(_entry(data, artifact), precision)
        assert code == 0, stderr
    elif case in BROKEN:
        maker, feature = BROKEN[case]
        artifact = maker(tmp_path, source)
        code, data, stderr = _parity(source, artifact)
        _assert_fails_at(_entry(data, artifact), feature)
        assert code == 1, stderr
    elif case == "onnx2tf_flex":
        artifact = _onnx2tf("flex")(tmp_path, source)
        code, data, stderr = _parity(source, artifact)
        entry = _entry(data, artifact)
        assert entry["status"] == "unavailable" and "FlexErf" in entry["reason"], entry
        assert code != 0, "an artifact that cannot run is never a pass"
    else:
        _check_grn_overflow(tmp_path)


def _check_grn_overflow(folder: Path) -> None:
    """A checkpoint whose stage-1 GRN norm passes 65504: its float32 torch.export program passes, its float16 one
    (PyTorch computes GRN in float16) fails at stage 1 (its graph run node by node), naming GRN's norm as the first
    non-finite op, and the report's float16 headroom shows the GRN sum of squares past 65504 at stage 1."""
    scaled = corpus.make_source(folder / "source", grn_overflow=True, size=models.OVERFLOW_SIZE)
    float32 = corpus.make_torch_export(folder, scaled, name="grn_overflow_float32")
    float16 = corpus.make_grn_overflow_float16(folder, scaled)
    code, data, stderr = _parity(scaled, float32, float16)
    assert code == 1, stderr
    _assert_passes(_entry(data, float32), "float32")
    entry = _entry(data, float16)
    assert entry["precision"] == "float16", entry["precision_how"]
    _assert_fails_at(entry, "stage1")
    bad = entry["first_divergence"]["non_finite_op"] or {}
    assert (bad.get("stage"), bad.get("kind")) == ("stage1", "GRN"), entry["first_divergence"]
    headroom = entry.get("headroom") or {}
    assert headroom.get("stage1", {}).get("grn_sum_of_squares", 0) > FLOAT16_MAX, headroom
