"""ONNX out (every export path) and ONNX in (files from this toolkit, timm, transformers, tf2onnx).

Oracles: onnxruntime runs the files (at ORT_ENABLE_ALL); the float64 PyTorch reference is the referee and the
float32 one the yardstick (the parity rule, convnextv2.reference.parity_rule, same inputs); timm's own
``checkpoint_filter_fn`` and transformers' module names place the source weights in the peers, so the importer
is checked against what the peers hold.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from convnextv2 import converters, reference
from convnextv2.converters.onnx import session as onnx_session
from convnextv2.fixtures import make_checkpoint, write_fixture
from convnextv2.parity_tests.conftest_helpers import run_cli
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError, CheckFailedError
from convnextv2.reference.parity_rule import seeded_images
from convnextv2.reference.variants import VARIANTS

pytestmark = pytest.mark.onnx

# Small enough for the default suite, with every structural feature (4 stages, >1 block, a head).
SMALL = "custom:depths=1,1,2,1;dims=8,16,32,64"
SIZE = 64


def _ort(path: Path) -> object:
    return onnx_session.ort_session(path)


def _run(session: object, images: np.ndarray) -> dict[str, np.ndarray]:
    return onnx_session.run_ort(session, images)


def _export(ckpt, path: Path, *, batch: int = 4, overwrite: bool = False, **options) -> dict:
    """converters.save to ONNX: the export gate at ``batch`` images, the read-back; the summary."""
    return converters.save(ckpt, path, "onnx", overwrite=overwrite, gate=converters.GateOptions(batch=batch),
                           **options)


def _outputs(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _rule(got: np.ndarray, baseline: np.ndarray, referee: np.ndarray, dtype: str = "float32",
          name: str = "logits") -> dict:
    """The parity rule's verdict on ``got``, ``baseline`` (PyTorch at the rule's baseline precision) the yardstick."""
    referee = np.asarray(referee, dtype=np.float64)
    judged = parity_rule.judge(name, got, referee, parity_rule.scale_aware_error(baseline, referee), dtype)
    return {"passed": judged.passed, "max_abs": judged.max_abs_error,
            "torch_baseline_max_abs": parity_rule.max_abs_error(baseline, referee)}


def _assert_parity(ckpt, got: np.ndarray, images: np.ndarray, output: str = "logits") -> dict:
    """got vs the float64 referee by the parity rule's float32 verdict (the PyTorch float32 error on the same
    images as the yardstick); top-1 identical."""
    referee = parity_rule.referee_features(ckpt, images)[output]
    fp32 = parity_rule.baseline_features(ckpt, images)[output]
    verdict = _rule(got, fp32, referee, "float32", output)
    assert verdict["passed"], (f"{output}: max|d| {verdict['max_abs']:.3e} > the rule's tolerance "
                               f"({parity_rule.describe('float32')}; PyTorch float32 {verdict['torch_baseline_max_abs']:.3e})")
    if output == "logits":
        assert np.array_equal(got.argmax(1), referee.argmax(1))
    return {"max_abs": verdict["max_abs"], "torch_fp32": verdict["torch_baseline_max_abs"]}


def _assert_same(source: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    """Bit-exact where the exporter kept the values (every producer tested here keeps them)."""
    assert list(got) == list(source)
    for name, value in source.items():
        assert got[name].shape == value.shape, name
        assert np.array_equal(np.asarray(got[name], dtype=np.float32), value), (
            f"{name}: max diff {np.abs(np.asarray(got[name], np.float64) - value).max():.3e}")


# ------------------------------------------------------------------------------------------- export


@pytest.mark.torch
def test_export_cli_parity_batches_metadata_and_round_trip(tmp_path):
    src = tmp_path / "small.pt"
    ckpt = write_fixture(src, SMALL, "original", seed=3, num_classes=10)
    out = tmp_path / "small.onnx"
    result = run_cli("export-onnx", str(src), "-o", str(out), "--check-size", str(SIZE))
    assert result.returncode == 0, result.stderr
    assert "parity:" in result.stdout and sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx", "small.pt"]

    import onnx

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [20]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["schema_version"] == "1"
    assert json.loads(meta["config"])["dims"] == [8, 16, 32, 64]
    assert json.loads(meta["preprocessing"])["input_size"] == 224
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()

    # One file, batch 1 and batch 7.
    session = _ort(out)
    for batch in (1, 7):
        images = seeded_images(batch, SIZE, seed=batch)
        _assert_parity(ckpt, _run(session, images)["logits"], images)

    # ONNX in: the exported file gives the source tensors back, bit for bit.
    back = tmp_path / "back.safetensors"
    result = run_cli("convert", str(out), "-o", str(back), "--to", "canonical")
    assert result.returncode == 0, result.stderr
    _assert_same(ckpt.model_tensors(), converters.load(back).model_tensors())


@pytest.mark.torch
def test_export_is_deterministic_and_external_data_is_atomic(tmp_path):
    src = tmp_path / "src.safetensors"
    write_fixture(src, SMALL, "canonical", seed=1, num_classes=0)  # headless: output "pooled"
    ckpt = converters.load(src)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    result = run_cli("convert", str(src), "-o", str(a), "--to", "onnx")  # checks at the input size, 224
    assert result.returncode == 0, result.stderr
    _export(ckpt, b, size=224)
    assert a.read_bytes() == b.read_bytes()
    a.unlink()
    b.unlink()

    ext = tmp_path / "ext.onnx"
    result = _export(ckpt, ext, size=SIZE, external_data=True)
    assert result["check"]["ok"] and _outputs(ext) == ["pooled"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "src.safetensors"]
    assert ext.stat().st_size < 100_000 < (tmp_path / "ext.onnx.data").stat().st_size
    images = seeded_images(2, SIZE)
    _assert_parity(ckpt, _run(_ort(ext), images)["pooled"], images, output="pooled")
    _assert_same(ckpt.model_tensors(), converters.load(ext).model_tensors())
    with pytest.raises(BadInputError, match="already exists"):
        _export(ckpt, ext, size=SIZE)


@pytest.mark.torch
def test_overwriting_an_external_data_export_publishes_both_files_and_drops_a_stale_data_file(tmp_path):
    ckpt = make_checkpoint(SMALL, seed=1, fmt="canonical", num_classes=10)
    out = tmp_path / "m.onnx"
    mask = os.umask(0o027)
    try:
        _export(ckpt, out, size=SIZE, external_data=True)
    finally:
        os.umask(mask)
    data = tmp_path / "m.onnx.data"
    # Published with the permissions a plain open() under that umask gives, not the temporary files' 0600.
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"m.onnx": 0o640, "m.onnx.data": 0o640}
    _export(ckpt, out, size=SIZE, external_data=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "the replaced model's .data file was kept"
    assert not data.exists()
    _assert_same(ckpt.model_tensors(), converters.load(out).model_tensors())


@pytest.mark.torch
def test_features_dynamic_hw_and_opset_18(tmp_path):
    ckpt = make_checkpoint(SMALL, seed=2, fmt="canonical", num_classes=10)
    out = tmp_path / "features.onnx"
    _export(ckpt, out, size=SIZE, features=True, dynamic_hw=True, opset=18)
    outputs = _outputs(out)
    assert outputs == ["stem", "stage1", "stage2", "stage3", "stage4", "pooled", "logits"]
    session = _ort(out)
    import onnx

    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "Erf" in ops and "Gelu" not in ops  # opset 18: GELU decomposed (the default, 20, has the Gelu op)
    for size in (64, 96):
        images = seeded_images(2, size, seed=size)
        got = _run(session, images)
        referee = reference.run_features(reference.build(ckpt, "torch", dtype="float64"), "torch", images)
        for name in outputs:
            assert got[name].shape == referee[name].shape, name
            scale = float(np.abs(referee[name]).max())
            # Intermediate maps: scale-aware error at fp32 level (~1e-7); a wrong layer is off by >1e-2.
            assert float(np.abs(got[name] - referee[name]).max()) / scale < 1e-5, name
        _assert_parity(ckpt, got["logits"], images)
    _assert_same(ckpt.model_tensors(), converters.load(out).model_tensors())


@pytest.mark.torch
def test_fp16_export_keeps_norms_in_fp32(tmp_path):
    import onnx

    ckpt = make_checkpoint(SMALL, seed=4, fmt="canonical", num_classes=100)
    out = tmp_path / "half.onnx"
    result = _export(ckpt, out, size=SIZE, fp16=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out)))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    # GRN's statistic is the square root of a sum of squares (torch_model.GRN._graph_form): its Sqrt must see
    # float32, or the sum of squares overflowed in float16.
    norms = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Sqrt")]
    assert len(norms) == 1 + 3 + 5 + 5 + 1  # stem, downsamples, blocks' LN and GRN, head
    for node in norms:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, f"{node.op_type} {node.name} not in float32"
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
    images = seeded_images(4, SIZE, seed=9)
    got = _run(_ort(out), images)["logits"]
    referee = parity_rule.referee_features(ckpt, images)["logits"]
    # The float16 rule: the yardstick is the PyTorch reference in float16 with float32 norms, same images.
    fp16 = parity_rule.baseline_features(ckpt, images, "float16")["logits"]
    verdict = _rule(got, fp16, referee, "float16")
    assert verdict["passed"], verdict
    assert np.array_equal(got.argmax(1), referee.argmax(1))
    assert result["check"]["ok"] and "float16 parity rule" in result["check"]["message"]
    # Back in: fp16 weights come back as float32 values that round-trip through fp16 exactly.
    back = converters.load(out)
    w = ckpt.tensors["stages.2.blocks.1.pwconv1.weight"]
    assert np.array_equal(back.tensors["stages.2.blocks.1.pwconv1.weight"], w.astype(np.float16).astype(np.float32))
    assert np.array_equal(back.tensors["stages.2.blocks.1.norm.weight"], ckpt.tensors["stages.2.blocks.1.norm.weight"])


@pytest.mark.torch
def test_failed_parity_writes_nothing_and_exits_1(tmp_path, monkeypatch):
    import torch

    ckpt = make_checkpoint(SMALL, seed=5, fmt="canonical", num_classes=10)
    from convnextv2.converters.onnx import via_torch as onnx_via_torch

    original = onnx_via_torch.torch_module

    def broken(*args, **kwargs):
        module = original(*args, **kwargs)
        with torch.no_grad():
            module.model.stages[2].blocks[1].grn.gamma.mul_(1.01)  # a 1% slip in one GRN
        return module

    monkeypatch.setattr(onnx_via_torch, "torch_module", broken)
    with pytest.raises(CheckFailedError, match="fails parity") as info:
        _export(ckpt, tmp_path / "bad.onnx", size=SIZE)
    assert info.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


def test_flax_path_works_or_says_why(tmp_path):
    src = tmp_path / "small.safetensors"
    write_fixture(src, SMALL, "canonical", seed=0, num_classes=10)
    result = run_cli("export-onnx", str(src), "-o", str(tmp_path / "f.onnx"), "--via", "flax",
                     "--check-size", str(SIZE))
    if importlib.util.find_spec("jax2onnx") is None:
        assert result.returncode == 2
        assert "jax2onnx" in result.stderr and "orbax-checkpoint" in result.stderr
    else:
        assert result.returncode == 0, result.stderr


# -------------------------------------------------------------------------------------- import


def _scramble(path: Path, out: Path) -> None:
    """Rename every initializer and turn half of them into Constant nodes: what folding exporters do."""
    import onnx

    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    renames = {t.name: f"w{rng.integers(1 << 30)}_{i}" for i, t in enumerate(model.graph.initializer)}
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
    constants = []
    keep = []
    for index, tensor in enumerate(model.graph.initializer):
        tensor.name = renames[tensor.name]
        if index % 2:
            constants.append(onnx.helper.make_node("Constant", [], [tensor.name], value=tensor))
        else:
            keep.append(tensor)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = constants + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.metadata_props[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


@pytest.mark.torch
def test_import_uses_structure_not_names(tmp_path):
    ckpt = make_checkpoint(SMALL, seed=6, fmt="fcmae")  # an FCMAE encoder: no final norm, no classifier
    assert not ckpt.config.head_norm and ckpt.config.num_classes == 0
    out = tmp_path / "ours.onnx"
    assert _export(ckpt, out, size=SIZE)["check"]["ok"] and _outputs(out) == ["pooled"]
    scrambled = tmp_path / "scrambled.onnx"
    _scramble(out, scrambled)
    back = converters.load(scrambled)
    assert back.source.format == "onnx" and back.config == ckpt.config
    _assert_same(ckpt.model_tensors(), back.model_tensors())


def _tiny_resnet_onnx(path: Path) -> None:
    import torch
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.conv1 = nn.Conv2d(width, width, 3, padding=1)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

    model = nn.Sequential(nn.Conv2d(3, 16, 7, stride=2, padding=3), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          Basic(16), Basic(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    torch.onnx.export(model, (torch.zeros(2, 3, 64, 64),), str(path), dynamo=True, external_data=False)


@pytest.mark.torch
def test_refuses_a_graph_that_is_not_convnextv2(tmp_path):
    resnet = tmp_path / "resnet.onnx"
    _tiny_resnet_onnx(resnet)
    result = run_cli("convert", str(resnet), "-o", str(tmp_path / "x.safetensors"), "--to", "canonical",
                     "--from", "onnx")
    assert result.returncode == 2
    assert "not a ConvNeXt V2 graph: expected the stem: Conv with kernel 4x4, stride 4" in result.stderr
    assert "found Conv node" in result.stderr and "kernel [7, 7], stride [2, 2]" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.torch
def test_refuses_tanh_gelu_with_the_node_named(tmp_path):
    """A ConvNeXt V2 whose GELU is the tanh approximation is a different function: refused at that block."""
    import torch

    ckpt = make_checkpoint(SMALL, seed=7, fmt="canonical", num_classes=10)
    model = reference.build(ckpt, "torch")
    from convnextv2.reference import torch_model

    def tanh_block(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = torch.nn.functional.gelu(self.pwconv1(self.norm(y)), approximate="tanh")
        return x + self.pwconv2(self.grn(y)).permute(0, 3, 1, 2)

    path = tmp_path / "tanh.onnx"
    original = torch_model.Block.forward
    torch_model.Block.forward = tanh_block
    try:
        torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=True, external_data=False)
    finally:
        torch_model.Block.forward = original
    with pytest.raises(BadInputError, match=r"stage 0 block 0: GRN: the exact GELU .* found Gelu node .*approximate='tanh'"):
        converters.load(path, format="onnx")


def _timm_model(ckpt, tmp_path: Path, constructor: str):
    import torch

    from convnextv2.converters.runners.peers import import_timm
    from convnextv2.converters.torchzip import read_torch_zip

    timm = import_timm()
    from timm.models.convnext import checkpoint_filter_fn

    src = tmp_path / "original.pt"
    converters.save(ckpt, src, format="original", overwrite=True)
    state = {k: torch.from_numpy(np.array(v)) for k, v in read_torch_zip(src)["model"].items()}
    model = timm.create_model(constructor, pretrained=False, num_classes=ckpt.config.num_classes,
                              depths=ckpt.config.depths, dims=ckpt.config.dims).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    return model


def _hf_model(ckpt, head_eps: float):
    import torch

    from convnextv2.converters.runners.peers import import_transformers

    tr = import_transformers()
    config = tr.ConvNextV2Config(depths=list(ckpt.config.depths), hidden_sizes=list(ckpt.config.dims),
                                 num_labels=ckpt.config.num_classes, layer_norm_eps=head_eps)
    model = tr.ConvNextV2ForImageClassification(config).eval()
    stages = {"downsample.norm": "downsampling_layer.0", "downsample.conv": "downsampling_layer.1"}
    leaf = {"norm": "layernorm", "grn.gamma": "grn.weight", "grn.beta": "grn.bias"}

    def hf_name(name: str) -> str:  # transformers' module names
        fixed = {"stem.conv": "convnextv2.embeddings.patch_embeddings", "stem.norm": "convnextv2.embeddings.layernorm",
                 "head.norm": "convnextv2.layernorm", "head.fc": "classifier"}
        for ours, theirs in fixed.items():
            if name.startswith(ours + "."):
                return theirs + name[len(ours):]
        parts = name.split(".")
        stage, rest = parts[1], ".".join(parts[2:])
        for ours, theirs in stages.items():
            if rest.startswith(ours):
                return f"convnextv2.encoder.stages.{stage}.{theirs}{rest[len(ours):]}"
        block, inner = parts[3], ".".join(parts[4:])
        for ours, theirs in leaf.items():
            if inner.startswith(ours + ".") or inner == ours:
                inner = theirs + inner[len(ours):]
        return f"convnextv2.encoder.stages.{stage}.layers.{block}.{inner}"

    target = model.state_dict()
    state = {hf_name(k): torch.from_numpy(np.array(v)).reshape(target[hf_name(k)].shape)
             for k, v in ckpt.model_tensors().items()}
    model.load_state_dict(state, strict=True)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    return Logits().eval()


def _export_peer(model, path: Path, dynamo: bool, **kwargs) -> None:
    import torch

    example = torch.zeros(2, 3, SIZE, SIZE)
    if dynamo:
        torch.onnx.export(model, (example,), str(path), dynamo=True, **kwargs)
    else:
        torch.onnx.export(model, (example,), str(path), dynamo=False, **kwargs)


def _check_import(ckpt, path: Path, head_eps: float = 1e-6) -> None:
    back = converters.load(path)
    assert back.config == ckpt.config.with_(head_norm_eps=head_eps)
    _assert_same(ckpt.model_tensors(), back.model_tensors())
    images = seeded_images(2, SIZE, seed=11)  # peers export a static batch of 2 by default
    _assert_parity(back, next(iter(_run(_ort(path), images).values())), images)


@pytest.mark.peers
@pytest.mark.torch
@pytest.mark.parametrize("constructor", ["convnextv2_atto", "convnextv2_tiny"])  # 1x1-conv MLP / Linear MLP
def test_import_timm_exports(tmp_path, constructor):
    ckpt = make_checkpoint(SMALL, seed=8, fmt="original", num_classes=10)
    model = _timm_model(ckpt, tmp_path, constructor)
    for dynamo in (True, False):
        path = tmp_path / f"timm_{dynamo}.onnx"
        _export_peer(model, path, dynamo)
        _check_import(ckpt, path)
    # The legacy exporter below opset 17 decomposes LayerNorm into ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add.
    path = tmp_path / "timm_opset16.onnx"
    _export_peer(model, path, False, opset_version=16)
    assert converters.load(path).source.layout["layer_norm"] == ["decomposed LayerNorm"]
    _check_import(ckpt, path)


@pytest.mark.peers
@pytest.mark.torch
def test_import_transformers_exports(tmp_path):
    ckpt = make_checkpoint(SMALL, seed=9, fmt="original", num_classes=10)
    # transformers' default final-norm eps (1e-12) is read back from the graph into the config.
    model = _hf_model(ckpt, head_eps=1e-12)
    for dynamo in (True, False):
        path = tmp_path / f"hf_{dynamo}.onnx"
        _export_peer(model, path, dynamo)
        back = converters.load(path)
        assert back.config.head_norm_eps == 1e-12
        _assert_same(ckpt.model_tensors(), back.model_tensors())
        images = seeded_images(2, SIZE, seed=12)
        _assert_parity(back, next(iter(_run(_ort(path), images).values())), images)


# ------------------------------------------------------------------------------- TensorFlow path


@pytest.mark.tf
@pytest.mark.torch
def test_tensorflow_path_export_and_nhwc_import(tmp_path):
    import tensorflow as tf
    import tf2onnx

    ckpt = make_checkpoint(SMALL, seed=10, fmt="canonical", num_classes=10)
    out = tmp_path / "keras.onnx"
    result = _export(ckpt, out, via="tensorflow", size=SIZE)
    assert result["check"]["ok"]
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["export"])["via"] == "tensorflow"
    session = _ort(out)
    assert session.get_inputs()[0].name == "pixel_values" and session.get_inputs()[0].shape[1] == 3
    for batch in (1, 7):
        images = seeded_images(batch, SIZE, seed=batch)
        _assert_parity(ckpt, _run(session, images)["logits"], images)
    _assert_same(ckpt.model_tensors(), converters.load(out).model_tensors())

    # A plain tf2onnx export of the Keras reference: NHWC input, as someone else would make it (with a plain
    # Dense classifier, as a user's Keras model has).
    keras_model = reference.build(ckpt, "tensorflow", plain_head=True)
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="images"),)

    @tf.function(input_signature=spec)
    def forward(images):
        return keras_model(images, training=False)

    nhwc = tmp_path / "keras_nhwc.onnx"
    tf2onnx.convert.from_function(forward, input_signature=spec, opset=18, output_path=str(nhwc))
    back = converters.load(nhwc)
    assert back.source.layout["input_layout"] == "NHWC"
    _assert_same(ckpt.model_tensors(), back.model_tensors())
    images = seeded_images(2, SIZE, seed=13)
    got = list(_run(_ort(nhwc), np.ascontiguousarray(images.transpose(0, 2, 3, 1))).values())[0]
    _assert_parity(ckpt, got, images)


# ------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "huge"])
def test_every_size_at_224(tmp_path, variant):
    ckpt = make_checkpoint(variant, seed=0, fmt="canonical")
    out = tmp_path / f"{variant}.onnx"
    result = _export(ckpt, out, size=224)
    assert result["check"]["ok"], result["check"]["message"]
    images = seeded_images(2, 224, seed=21)
    _assert_parity(ckpt, _run(_ort(out), images)["logits"], images)
    _assert_same(ckpt.model_tensors(), converters.load(out).model_tensors())


@pytest.mark.slow
@pytest.mark.torch
def test_huge_exports_with_external_data(tmp_path):
    ckpt = make_checkpoint("huge", seed=0, fmt="canonical")
    out = tmp_path / "huge.onnx"
    result = _export(ckpt, out, batch=2, size=224)
    data = tmp_path / "huge.onnx.data"
    assert data.exists() and result["check"]["ok"], result["check"]["message"]
    assert out.stat().st_size < 10_000_000 and data.stat().st_size > 2_000_000_000
    _assert_same(ckpt.model_tensors(), converters.load(out).model_tensors())
