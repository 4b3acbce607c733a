"""Reduced precision as a parity dimension: ``convnextv2 parity --dtype bfloat16|float16``. Each runtime that can
run a precision is judged by the rule for it (yardstick: the PyTorch reference at that precision with its norms
in float32); one that cannot is listed "not available at" it; and a model that computes GRN's sum of squares and
LayerNorm's variance in float16 fails."""

from __future__ import annotations

import importlib.util
import json

import pytest

from convnextv2.fixtures import make_checkpoint, write_fixture
from convnextv2.parity_tests.conftest_helpers import run_cli
from convnextv2.parity_tests.harness import FEATURES, run_parity
from convnextv2.parity_tests.traps import REDUCED_PRECISION_TRAPS, trap_runtime

pytestmark = pytest.mark.torch
CONFIG = "custom:depths=1,1,2,1;dims=8,16,32,64"
TRAP = "float16-norms"


def test_float16_norms_trap_fails_at_stage1_while_our_float16_paths_pass():
    """On weights whose stage-1 MLP activations are large (as trained ones are), the float16 sum of squares
    overflows: the trap fails where GRN first runs. The same weights pass in our float16 recipe, in PyTorch and
    in onnxruntime on the --fp16 ONNX export, an independent implementation of it."""
    trap = REDUCED_PRECISION_TRAPS[TRAP]
    ckpt = trap.expose(make_checkpoint(CONFIG, seed=1))
    runtimes = ["torch", trap_runtime(TRAP)]
    has_onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
    if has_onnx:
        runtimes.insert(1, "onnxruntime")
    report = run_parity(ckpt, runtimes, dtypes=["float16"], image_size=64, batch=2, seed=3)
    ours = report.result("torch", "float16")
    assert ours.status == "pass", [(f.name, f.message) for f in ours.features]
    if has_onnx:
        ort = report.result("onnxruntime", "float16")
        assert ort.status == "pass", (ort.reason, [(f.name, f.message) for f in ort.features])
    broken = report.result(f"torch-trap:{TRAP}", "float16")
    assert broken.status == "fail" and broken.first_divergence == trap.first_stage == "stage1"
    assert broken.feature("stem").status == "pass"
    assert broken.feature("stage1").message == "non-finite values"
    assert report.exit_code == 1


def test_float16_norms_trap_needs_its_exposing_weights():
    """On fixture weights (activations ~0.05) nothing overflows and float16 norms stay within the rule: the
    trap's weights are what makes the bug visible, as real checkpoints do."""
    report = run_parity(make_checkpoint(CONFIG, seed=1), [trap_runtime(TRAP)], dtypes=["float16"], image_size=64,
                        batch=2, seed=3)
    assert report.result(f"torch-trap:{TRAP}", "float16").status == "pass"


def test_reduced_precision_tolerance_is_the_rule_at_that_precision():
    ckpt = make_checkpoint(CONFIG, seed=2)
    report = run_parity(ckpt, ["torch"], dtypes=["float32", "bfloat16", "float16"], image_size=64, batch=2)
    data = report.to_json_dict()
    reduced = data["baseline"]["reduced"]
    assert set(reduced) == {"bfloat16", "float16"}
    for dtype in ("bfloat16", "float16"):
        result = report.result("torch", dtype)
        assert result.status == "pass"
        for feature in result.features:
            base = reduced[dtype]["scale_aware_error"][feature.name]
            # The reference at that precision is its own yardstick, and the tolerance is FACTOR times it.
            assert feature.scale_aware_error == pytest.approx(base)
            assert feature.tolerance_scale_aware == pytest.approx(6.0 * base)
    # bfloat16 keeps 8 bits of mantissa, float16 11: the yardsticks are ordered, and far above float32's.
    for name in FEATURES:
        fp32 = data["baseline"]["scale_aware_error"][name]
        assert reduced["bfloat16"]["scale_aware_error"][name] > reduced["float16"]["scale_aware_error"][name] > 10 * fp32


def test_cli_dtype_lists_runtimes_that_cannot_run_it(tmp_path):
    """--dtype float16 through the command line: torch runs it, flax is "not available at float16" (not a failure),
    exit 0, and the JSON report (schema-valid) carries the float16 yardstick."""
    jsonschema = pytest.importorskip("jsonschema", reason="report schema validation needs jsonschema")
    src = tmp_path / "m.safetensors"
    write_fixture(src, CONFIG, "canonical", seed=0)
    report_path = tmp_path / "r.json"
    done = run_cli("parity", str(src), "--runtimes", "torch,flax", "--dtype", "float16", "--image-size", "64",
                   "--batch", "2", "--report", str(report_path))
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    assert "not available at float16" in done.stdout
    data = json.loads(report_path.read_text())
    from importlib.resources import files

    schema = json.loads(files("convnextv2.parity_tests").joinpath("schemas/parity-report.schema.json").read_text())
    jsonschema.validate(data, schema)
    rows = {(r["name"], r["dtype"]): r for r in data["runtimes"]}
    assert rows[("torch", "float16")]["status"] == "pass"
    assert rows[("flax", "float16")]["status"] == "unavailable"
    assert "float16" in data["tolerance"] and "float16" in data["baseline"]["reduced"]


def test_cli_refuses_an_unknown_dtype(tmp_path):
    src = tmp_path / "m.safetensors"
    write_fixture(src, CONFIG, "canonical", seed=0)
    done = run_cli("parity", str(src), "--dtype", "int8")
    assert done.returncode == 2
    assert "bfloat16" in done.stderr
