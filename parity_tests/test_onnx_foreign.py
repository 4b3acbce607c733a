"""ONNX files made by other tools: each is read exactly or refused by name; none is read wrongly.

The artifacts are built here with the real tools (``convnextv2.fixtures.foreign_onnx``): onnxruntime's optimiser
at every level and its quantizer, onnxsim and onnxslim, timm exported with ``torch.onnx``, optimum, Keras 3.

Oracles. A read is exact when every recovered tensor equals the source's bit for bit (our fixture weights, or
timm's and transformers' own state dicts) and, independently, when onnxruntime running the foreign graph as it
is written (optimisations disabled) agrees with the PyTorch reference built from the recovered tensors by the
parity rule (``reference/parity_rule.py``). A refusal names the op type and its domain (or says "quantized"),
exits 2 through the command line for ``inspect`` and ``convert``, and writes nothing.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convnextv2 import converters, reference
from convnextv2.converters.checkpoint import Preprocessing
from convnextv2.converters.cli import main
from convnextv2.fixtures import foreign_onnx as foreign
from convnextv2.fixtures import make_checkpoint
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError

pytestmark = [pytest.mark.onnx, pytest.mark.torch]

# Widths that are not multiples of onnxruntime's NCHWc block (8 or 16 lanes), so its padding would show.
ODD = "custom:depths=1,1,2,1;dims=12,24,48,96"
SIZE = 64


def _needs(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed ({why}; pip install 'convnextv2-toolkit[foreign]')")


def _timm():
    from convnextv2.converters.runners.peers import import_timm

    return import_timm()


# ------------------------------------------------------------------------------------------ oracles


def _plain_session(path: Path):
    """onnxruntime with every optimisation off: the graph runs as the other tool wrote it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _assert_runs_like_reference(path: Path, back) -> None:
    """The foreign graph in onnxruntime vs the PyTorch reference built from the recovered tensors, judged by
    the parity rule against the float64 referee (the PyTorch float32 error as the yardstick); top-1 identical."""
    session = _plain_session(path)
    spec = session.get_inputs()[0]
    dims = list(spec.shape)
    nhwc = dims[-1] == 3 and dims[1] != 3
    batch = dims[0] if isinstance(dims[0], int) else 2
    height = dims[1] if nhwc else dims[2]
    size = height if isinstance(height, int) else SIZE
    images = parity_rule.seeded_images(batch, size, seed=31)
    feed = np.ascontiguousarray(images.transpose(0, 2, 3, 1) if nhwc else images)
    got = session.run(None, {spec.name: feed})[0]
    name = "logits" if back.config.num_classes else "pooled"
    referee = parity_rule.referee_features(back, images)[name]
    baseline = parity_rule.baseline_features(back, images)[name]
    judged = parity_rule.judge(name, got.reshape(referee.shape), referee,
                               parity_rule.scale_aware_error(baseline, referee), "float32")
    assert judged.passed, (f"{path.name}: onnxruntime vs the reference from the recovered tensors: max|d| "
                           f"{judged.max_abs_error:.3e}, PyTorch float32 "
                           f"{parity_rule.max_abs_error(baseline, referee):.3e}")
    if name == "logits":
        assert np.array_equal(got.reshape(referee.shape).argmax(1), referee.argmax(1))


def _assert_exact(path: Path, expected: dict[str, np.ndarray]):
    """Read ``path``: the same canonical tensors as ``expected``, bit for bit, and the graph runs like them."""
    back = converters.load(path)
    got = back.model_tensors()
    assert sorted(got) == sorted(expected), set(got) ^ set(expected)
    differing = [k for k, v in expected.items()
                 if got[k].shape != v.shape or not np.array_equal(np.asarray(got[k], np.float32), v)]
    assert not differing, f"{path.name}: {len(differing)} of {len(expected)} tensors differ: {differing[:6]}"
    _assert_runs_like_reference(path, back)
    return back


def _assert_refused(path: Path, tmp_path: Path, pattern: str) -> str:
    """Refused with exit 2 by ``inspect`` and ``convert``, the message matching ``pattern``, nothing written."""
    with pytest.raises(BadInputError) as caught:
        converters.load(path)
    message = str(caught.value)
    assert re.search(pattern, message), message
    out = tmp_path / f"{path.stem}.safetensors"
    for args in (["inspect", str(path)], ["convert", str(path), "--to", "canonical", "-o", str(out)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.exit_code, result.output)
        assert re.search(pattern, result.stderr), result.stderr
    assert not out.exists() and not list(tmp_path.glob(f"{path.stem}.safetensors*"))
    return message


def _ops(path: Path) -> set[tuple[str, str]]:
    import onnx

    return {(n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node}


def _timm_canonical(model, folder: Path) -> dict[str, np.ndarray]:
    """timm's own state dict, placed in canonical names by the timm reader."""
    from safetensors.torch import save_file

    path = folder / "timm_state.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return converters.load(path, format="timm").model_tensors()


NCHWC = r"com\.microsoft\.nchwc:(Conv|ReorderInput|ReorderOutput) node '[^']+'"


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """One export of ours for the module (the export and its check are the costly part)."""
    ckpt = make_checkpoint(ODD, seed=41, fmt="canonical", num_classes=10)
    return ckpt, foreign.toolkit_export(ckpt, tmp_path_factory.mktemp("ours") / "ours.onnx", SIZE)


# ---------------------------------------------------------------------- onnxruntime's saved graphs


def _check_ort_levels(source: Path, tmp_path: Path, expected: dict[str, np.ndarray],
                      fusion: tuple[str, str] | None) -> None:
    for level in foreign.ORT_LEVELS:
        path = foreign.ort_optimized(source, tmp_path / f"{source.stem}_{level}.onnx", level)
        ops = _ops(path)
        if level == "ALL":
            assert any(domain == "com.microsoft.nchwc" for domain, _ in ops), ops  # the case under test is there
            message = _assert_refused(path, tmp_path, NCHWC)
            assert "channels" not in message  # no padded width is reported as the model's
            continue
        if level == "EXTENDED" and fusion:
            assert fusion in ops, ops
        _assert_exact(path, expected)


def test_ort_optimised_toolkit_export(tmp_path, ours):
    """Our own export saved by onnxruntime: BASIC and EXTENDED (com.microsoft:BiasGelu, whose bias is the first
    linear's) read exactly; ALL (NCHWc blocked and padded convolutions) refused naming the op and domain."""
    ckpt, source = ours
    _check_ort_levels(source, tmp_path, ckpt.model_tensors(), ("com.microsoft", "BiasGelu"))


@pytest.mark.peers
def test_ort_optimised_timm_export(tmp_path):
    """timm's convnextv2_atto holding our fixture weights (through our timm format), exported by torch.onnx, then
    saved by onnxruntime at every level."""
    ckpt = make_checkpoint("atto", seed=42, fmt="original", num_classes=1000)
    model = foreign.timm_model(_timm(), ckpt, tmp_path, "convnextv2_atto")
    source = foreign.torch_export(model, tmp_path / "timm_atto.onnx", SIZE, opset=17, dynamo=False)
    _check_ort_levels(source, tmp_path, ckpt.model_tensors(), None)


@pytest.mark.slow
def test_ort_optimised_toolkit_export_atto(tmp_path):
    ckpt = make_checkpoint("atto", seed=43, fmt="canonical")
    source = foreign.toolkit_export(ckpt, tmp_path / "ours_atto.onnx", SIZE)
    _check_ort_levels(source, tmp_path, ckpt.model_tensors(), ("com.microsoft", "BiasGelu"))


@pytest.mark.slow
@pytest.mark.peers
@pytest.mark.parametrize("dynamo", [True, False])
def test_ort_optimised_timm_tiny(tmp_path, dynamo):
    """timm's tiny has Linear MLPs (1x1 convolutions below it): each onnxruntime level reads exactly or is
    refused by name."""
    ckpt = make_checkpoint("tiny", seed=44, fmt="original")
    model = foreign.timm_model(_timm(), ckpt, tmp_path, "convnextv2_tiny")
    source = foreign.torch_export(model, tmp_path / "timm_tiny.onnx", SIZE, opset=20 if dynamo else 17,
                                  dynamo=dynamo)
    # Both exporters write timm's Linear as a Gemm (bias inside), which onnxruntime does not fuse with the GELU
    # (our own export's MatMul + Add becomes BiasGelu, test_ort_optimised_toolkit_export): what EXTENDED
    # leaves must still read exactly.
    _check_ort_levels(source, tmp_path, ckpt.model_tensors(), None)


# -------------------------------------------------------------------- simplifiers, fresh weights


@pytest.fixture(scope="module")
def fresh_atto(tmp_path_factory):
    """timm's freshly initialised atto (LayerNorm 1 / 0, GRN and biases 0), exported once per opset."""
    folder = tmp_path_factory.mktemp("fresh")
    model = foreign.fresh_timm_model(_timm(), "convnextv2_atto", seed=0)
    expected = _timm_canonical(model, folder)
    exports: dict[int, Path] = {}

    def export(opset: int) -> Path:
        if opset not in exports:
            exports[opset] = foreign.torch_export(model, folder / f"fresh_{opset}.onnx", SIZE, opset, dynamo=False)
        return exports[opset]

    return expected, export


@pytest.mark.peers
@pytest.mark.parametrize("opset", [13, 17, 20])
@pytest.mark.parametrize("tool", foreign.SIMPLIFIERS)
def test_simplified_fresh_weights_read_as_identity(tmp_path, fresh_atto, tool, opset):
    """A simplifier removes the multiply by a unit LayerNorm scale and the add of a zero shift, bias or GRN beta:
    they read back as ones and zeros, equal to timm's own state dict."""
    _needs(tool, "the simplified graphs are made with it")
    expected, export = fresh_atto
    path = foreign.simplified(export(opset), tmp_path / f"{tool}_{opset}.onnx", tool)
    back = _assert_exact(path, expected)
    assert back.source.layout["identity_defaults"], "the simplifier removed nothing: the case is not exercised"
    for name, value in back.model_tensors().items():
        if name.endswith("norm.weight"):
            assert np.all(value == 1), name
        elif name.endswith(("norm.bias", "grn.gamma", "grn.beta")):
            assert np.all(value == 0), name


@pytest.mark.slow
@pytest.mark.peers
@pytest.mark.parametrize("tool", foreign.SIMPLIFIERS)
def test_simplified_fresh_weights_dynamo_export(tmp_path, tool):
    """The torch.export-based exporter already drops zero convolution biases; the simplifier then drops more."""
    _needs(tool, "the simplified graphs are made with it")
    model = foreign.fresh_timm_model(_timm(), "convnextv2_atto", seed=1)
    expected = _timm_canonical(model, tmp_path)
    source = foreign.torch_export(model, tmp_path / "fresh_dynamo.onnx", SIZE, opset=20, dynamo=True)
    _assert_exact(source, expected)
    _assert_exact(foreign.simplified(source, tmp_path / f"{tool}.onnx", tool), expected)


# ----------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("mode", ["dynamic", "qdq", "qoperator"])
def test_quantized_graphs_are_refused(tmp_path, ours, mode):
    source = ours[1]
    path = foreign.quantized(source, tmp_path / f"{mode}.onnx", mode, SIZE)
    _assert_refused(path, tmp_path, r"quantized graph \((.+ node '[^']+'|tensor '[^']+' is U?INT8)\)")


def _edited(source: Path, dest: Path, op_type: str, new_op: str, domain: str) -> Path:
    """``source`` with its first ``op_type`` node replaced by ``domain:new_op`` (same inputs): what a vendor
    optimiser writes when it fuses a pattern into its own op."""
    import onnx

    model = onnx.load(str(source))
    node = next(n for n in model.graph.node if n.op_type == op_type)
    node.op_type, node.domain = new_op, domain
    if domain and all(o.domain != domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    onnx.save(model, str(dest))
    return dest


@pytest.mark.parametrize(("op_type", "new_op", "domain", "pattern"), [
    # onnxruntime's tanh approximation, and its LayerNorm variants: not the functions ConvNeXt V2 computes
    ("Gelu", "FastGelu", "com.microsoft", r"com\.microsoft:FastGelu node '[^']+' is outside the standard ONNX domain"),
    ("LayerNormalization", "LayerNormalization", "com.microsoft",
     r"com\.microsoft:LayerNormalization node '[^']+' is outside the standard ONNX domain"),
    ("LayerNormalization", "SimplifiedLayerNormalization", "",
     r"found SimplifiedLayerNormalization node '[^']+', an op ConvNeXt V2 does not have"),
    ("Gelu", "Gelu", "ai.onnx.contrib", r"ai\.onnx\.contrib:Gelu node '[^']+' is outside the standard ONNX domain"),
])
def test_ops_not_mapped_exactly_are_refused_by_name(tmp_path, ours, op_type, new_op, domain, pattern):
    _assert_refused(_edited(ours[1], tmp_path / "edited.onnx", op_type, new_op, domain), tmp_path, pattern)


def test_an_op_convnextv2_does_not_have_is_refused_by_name(tmp_path):
    """A softmax after the classifier (or any op outside the grammar on the path of the image) is named."""
    import torch

    ckpt = make_checkpoint(ODD, seed=47, fmt="canonical", num_classes=10)
    model = reference.build(ckpt, "torch")
    wrapped = torch.nn.Sequential(model, torch.nn.Softmax(dim=-1)).eval()
    path = foreign.torch_export(wrapped, tmp_path / "softmax.onnx", SIZE, opset=17, dynamo=False)
    _assert_refused(path, tmp_path, r"expected the end of the model after the head; found Softmax node '[^']+', "
                                    r"an op ConvNeXt V2 does not have")


# ------------------------------------------------------------------------------- preprocessing


@pytest.mark.peers
def test_preprocessing_is_the_graph_input_size_and_marked_assumed(tmp_path, ours):
    import torch

    ckpt = make_checkpoint("atto", seed=48, fmt="original")
    model = foreign.timm_model(_timm(), ckpt, tmp_path, "convnextv2_atto")
    # A static 384 input: the size is the graph's; crop and interpolation are the 384 checkpoints' (assumed).
    static = foreign.torch_export(model, tmp_path / "static384.onnx", 384, opset=17, dynamo=False, batch=1)
    got = converters.load(static).preprocessing
    assert got == Preprocessing.for_resolution(384) and got.origin == "assumed"
    assert (got.input_size, got.crop_pct, got.crop_mode) == (384, 1.0, "squash")
    # A dynamic input states nothing: the default, assumed.
    dynamic = tmp_path / "dynamic.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(dynamic), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    got = converters.load(dynamic).preprocessing
    assert got == Preprocessing() and got.origin == "assumed"
    # Our own export states it in its metadata: read.
    back = converters.load(ours[1])
    assert back.preprocessing == Preprocessing() and back.preprocessing.origin == "read"


# ------------------------------------------------------------------------------ other exporters


@pytest.mark.peers
def test_optimum_export_of_a_transformers_folder(tmp_path):
    _needs("optimum.exporters.onnx", "optimum-onnx makes this artifact; it needs transformers < 4.58")
    from convnextv2.converters.runners.peers import import_transformers

    folder = foreign.transformers_folder(import_transformers(), tmp_path / "hf", (1, 1, 2, 1), (12, 24, 48, 96), 10)
    path = foreign.optimum_export(folder, tmp_path / "optimum")
    expected = converters.load(folder).model_tensors()  # the folder's own weights, in canonical names
    back = _assert_exact(path, expected)
    assert back.config.head_norm_eps == 1e-12  # transformers' layer_norm_eps, read from the graph
    assert back.preprocessing.origin == "assumed"


@pytest.mark.tf
def test_keras_export_of_the_keras_reference(tmp_path):
    _needs("tf2onnx", "Keras exports ONNX through it")
    ckpt = make_checkpoint(ODD, seed=50, fmt="canonical", num_classes=10)
    path = foreign.keras_export(ckpt, tmp_path / "keras.onnx", SIZE)
    back = _assert_exact(path, ckpt.model_tensors())
    assert back.source.layout["input_layout"] == "NHWC"
