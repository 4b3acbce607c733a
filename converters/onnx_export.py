"""ONNX export: the PyTorch reference through ``torch.onnx`` (default), the Keras reference through tf2onnx,
the Flax reference through jax2onnx. Every export is checked (onnx.checker, then onnxruntime at the full
optimisation level against the float64 PyTorch referee) before it is renamed into place.

Interface of every exported file (docs/onnx.md): input ``pixel_values`` (batch, 3, H, W) float32 NCHW, output
``logits`` (batch, K) float32, or ``pooled`` (batch, C3) for a headless model; ``--features`` adds ``stem``,
``stage1``..``stage4`` (NCHW) and ``pooled``. ``metadata_props`` carry the canonical metadata.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.atomic import _fsync_dir, _umask, check_destination
from convnextv2.converters.checkpoint import Checkpoint, sha256_of
from convnextv2.reference.errors import BadInputError, CheckFailedError, MissingDependencyError

VIAS = ("torch", "tensorflow", "flax")
# Measured (docs/onnx.md): at opset 20 GELU is the Gelu op, which onnxruntime 1.32 fuses with the preceding
# bias into BiasGelu at ORT_ENABLE_ALL; the opset-18 Erf pattern the exporter writes is not fused (291 against
# 231 nodes after optimisation for atto) and runs ~15% slower. tf2onnx 1.17 stops at opset 18.
DEFAULT_OPSET = {"torch": 20, "tensorflow": 18, "flax": 20}
MIN_OPSET = 18
MAX_OPSET = 20
INPUT_NAME = "pixel_values"
FEATURE_OUTPUTS = ("stem", "stage1", "stage2", "stage3", "stage4", "pooled")
# protobuf refuses messages of 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
PRODUCER_NAME = "convnextv2-toolkit"
# Spatial sizes must be multiples of the total stride.
STRIDE = 32
# fp16 keeps norms and GRN in fp32 but rounds every weight and activation: measured scale-aware logit error
# 5.4e-4 (atto at 96 and 224 px, docs/onnx.md); the bar is ~10x that.
FP16_TOLERANCE = 5e-3


@dataclasses.dataclass
class ExportResult:
    path: Path
    data_path: Path | None
    via: str
    opset: int
    outputs: list[str]
    check: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"output": str(self.path), "external_data": str(self.data_path) if self.data_path else None,
                "via": self.via, "opset": self.opset, "outputs": self.outputs, "check": self.check}


def output_names(ckpt: Checkpoint, features: bool) -> list[str]:
    final = "logits" if ckpt.config.num_classes > 0 else "pooled"
    if not features:
        return [final]
    names = list(FEATURE_OUTPUTS)
    if final == "logits":
        names.append("logits")
    return names


def data_file_name(path: Path) -> str:
    return path.name + ".data"


# --------------------------------------------------------------------------------------------- torch path


def _torch_module(ckpt: Checkpoint, features: bool, fp16: bool) -> Any:
    import torch
    from torch import nn

    from convnextv2 import reference
    from convnextv2.reference import torch_model

    model = reference.build(ckpt, "torch")
    names = output_names(ckpt, features)

    class Exported(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> Any:
            x = pixel_values.half() if fp16 else pixel_values
            if features:
                feats = self.model.forward_features(x)
                return tuple(feats[name].float() for name in names)
            return self.model(x).float()

    class Fp32Island(nn.Module):
        """Runs a norm in float32 inside an fp16 graph: GRN's sum of squares and LayerNorm's variance
        overflow or lose their digits in fp16 (facts §5)."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def _apply(self, fn: Any, recurse: bool = True) -> Any:
            return self  # the wrapper's .half() must not round the norms' own weights

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.float()).to(x.dtype)

    wrapper = Exported().eval()
    if fp16:
        norm_types = (nn.LayerNorm, torch_model.LayerNorm2d, torch_model.GRN)
        for parent in list(wrapper.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, norm_types):
                    setattr(parent, child_name, Fp32Island(child))
        wrapper.half()
    return wrapper


def _torch_proto(ckpt: Checkpoint, opset: int, dynamic_hw: bool, features: bool, fp16: bool,
                 example_size: int) -> Any:
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("the torch export path needs PyTorch: pip install 'convnextv2-toolkit[torch,onnx]'") from exc
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("torch.onnx.export needs onnxscript: pip install 'convnextv2-toolkit[onnx]'") from exc

    module = _torch_module(ckpt, features, fp16)
    # Batch 2, not 1: torch.export specialises a dimension whose example value is 1.
    example = torch.zeros(2, 3, example_size, example_size)
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=65536)}
    if dynamic_hw:
        dims[2] = STRIDE * torch.export.Dim("height_div_32", min=1, max=1024)
        dims[3] = STRIDE * torch.export.Dim("width_div_32", min=1, max=1024)
    names = output_names(ckpt, features)
    with torch.no_grad():
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=names,
            dynamic_shapes={"pixel_values": dims}, optimize=True, verbose=False,
        )
    proto = program.model_proto  # type: ignore[union-attr]  # torch stubs: None only when dynamo=False
    # Readable symbolic names for users of the file.
    for value in list(proto.graph.input) + list(proto.graph.output):
        shape = value.type.tensor_type.shape
        if len(shape.dim) >= 1 and shape.dim[0].dim_param:
            shape.dim[0].dim_param = "batch"
    return proto


# ---------------------------------------------------------------------------------------- Keras path


def _require_tensorflow_path() -> None:
    import importlib.util

    if importlib.util.find_spec("tf2onnx") is None:
        raise MissingDependencyError(
            "--via tensorflow needs tf2onnx: pip install -c constraints.txt 'convnextv2-toolkit[onnx,tf]'")
    if importlib.util.find_spec("convnextv2.reference.keras_model") is None:
        raise MissingDependencyError("--via tensorflow needs the Keras reference (convnextv2.reference.keras_model), "
                                     "which is not part of this install")


def _tensorflow_proto(ckpt: Checkpoint, opset: int, dynamic_hw: bool, features: bool, fp16: bool,
                      example_size: int) -> Any:
    _require_tensorflow_path()
    if fp16:
        raise BadInputError("--fp16 is only available with --via torch")
    if features:
        raise BadInputError("--features is only available with --via torch")
    import tensorflow as tf
    import tf2onnx

    from convnextv2 import reference

    model = reference.build(ckpt, "tensorflow")
    name = output_names(ckpt, False)[0]
    hw = None if dynamic_hw else example_size

    # The Keras reference is NHWC inside; the exported graph still takes NCHW pixel_values like every other path.
    @tf.function(input_signature=[tf.TensorSpec((None, 3, hw, hw), tf.float32, name=INPUT_NAME)])
    def forward(pixel_values: Any) -> Any:
        out = model(tf.transpose(pixel_values, (0, 2, 3, 1)), training=False)
        return {name: tf.identity(out, name=name)}

    proto, _ = tf2onnx.convert.from_function(forward, input_signature=forward.input_signature, opset=opset,
                                             output_path=None)
    return _rename_io(proto, name)


def _rename_io(proto: Any, output: str) -> Any:
    """tf2onnx names inputs ``pixel_values:0``; give the file the documented names."""
    renames = {proto.graph.input[0].name: INPUT_NAME, proto.graph.output[0].name: output}
    for node in proto.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.name = renames.get(value.name, value.name)
    return proto


# ------------------------------------------------------------------------------------------ Flax path

# Why the Flax path is not available in the pinned set (docs/onnx.md).
JAX2ONNX_CONFLICT = (
    "--via flax needs jax2onnx, which is not installed: jax2onnx 0.17.1 (the release that exports Flax NNX) "
    "requires orbax-checkpoint<0.11.37, while the pinned flax 0.12.8 environment uses orbax-checkpoint 0.12.8; "
    "installing it would downgrade a Flax dependency, so the toolkit does not declare it. Export with --via torch "
    "(same weights, same numbers) or install jax2onnx in a separate environment"
)


def _flax_proto(ckpt: Checkpoint, opset: int, dynamic_hw: bool, features: bool, fp16: bool,
                example_size: int) -> Any:
    import importlib.util

    if importlib.util.find_spec("jax2onnx") is None:
        raise MissingDependencyError(JAX2ONNX_CONFLICT)
    if importlib.util.find_spec("convnextv2.reference.flax_model") is None:
        raise MissingDependencyError("--via flax needs the Flax reference (convnextv2.reference.flax_model), "
                                     "which is not part of this install")
    if fp16 or features:
        raise BadInputError("--fp16 and --features are only available with --via torch")
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    from convnextv2 import reference

    model = reference.build(ckpt, "flax")
    name = output_names(ckpt, False)[0]

    def forward(pixel_values: Any) -> Any:
        return model(jnp.transpose(pixel_values, (0, 2, 3, 1)))

    hw: Any = "H" if dynamic_hw else example_size
    proto = to_onnx(forward, [("B", 3, hw, "W" if dynamic_hw else example_size)], opset=opset)
    return _rename_io(proto, name)


_BUILDERS = {"torch": _torch_proto, "tensorflow": _tensorflow_proto, "flax": _flax_proto}


def why_unavailable(via: str) -> str | None:
    """The reason an export path cannot run in this install, or None when it can."""
    import importlib.util

    if via == "torch":
        missing = [m for m in ("torch", "onnxscript", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        return f"--via torch needs {', '.join(missing)}" if missing else None
    if via == "tensorflow":
        try:
            _require_tensorflow_path()
        except MissingDependencyError as exc:
            return str(exc)
        return None
    if via == "flax":
        if importlib.util.find_spec("jax2onnx") is None:
            return JAX2ONNX_CONFLICT
        return None
    return f"unknown export path {via!r}; expected one of {', '.join(VIAS)}"


# --------------------------------------------------------------------------------------- file writing


def _finish_proto(proto: Any, ckpt: Checkpoint, via: str, opset: int, fp16: bool, features: bool,
                  dynamic_hw: bool, source_sha256: str) -> None:
    """Strip what makes bytes depend on the machine (stack traces, local paths) and attach the metadata."""
    for node in proto.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    proto.graph.doc_string = ""
    proto.doc_string = "ConvNeXt V2 exported by convnextv2-toolkit; metadata_props hold the canonical metadata"
    proto.producer_name = PRODUCER_NAME
    from importlib.metadata import PackageNotFoundError, version

    try:
        proto.producer_version = version("convnextv2-toolkit")
    except PackageNotFoundError:
        proto.producer_version = "unknown"
    meta = {k: v for k, v in ckpt.metadata().items() if k != "format"}
    meta["source_sha256"] = source_sha256
    meta["export"] = json.dumps({"via": via, "opset": opset, "fp16": fp16, "features": features,
                                 "dynamic_hw": dynamic_hw, "input": INPUT_NAME, "layout": "NCHW",
                                 "outputs": [o.name for o in proto.graph.output]}, sort_keys=True, separators=(",", ":"))
    del proto.metadata_props[:]
    for key in sorted(meta):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, meta[key]


def _save_proto(proto: Any, directory: Path, file_name: str, external: bool) -> Path | None:
    import onnx

    target = directory / file_name
    if not external:
        for tensor in proto.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(directory))
        target.write_bytes(proto.SerializeToString(deterministic=True))
        return None
    onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file_name(target), size_threshold=1024, convert_attribute=False)
    return directory / data_file_name(target)


def export(ckpt: Checkpoint, path: str | os.PathLike[str], *, via: str = "torch", opset: int | None = None,
           dynamic_hw: bool = False, features: bool = False, fp16: bool = False, external_data: bool | None = None,
           overwrite: bool = False, check_size: int | None = None, check_batch: int = 4,
           source_path: str | os.PathLike[str] | None = None, log: Any = None) -> ExportResult:
    """Export ``ckpt`` to ``path``; check it; only then rename it (and its ``.data`` file) into place.

    Raises CheckFailedError (exit 1) when onnxruntime's output is outside the parity bar; nothing is written then.
    """
    if via not in VIAS:
        raise BadInputError(f"unknown export path {via!r}; expected one of {', '.join(VIAS)}")
    opset = DEFAULT_OPSET[via] if opset is None else int(opset)
    if via == "tensorflow" and opset > 18:
        raise BadInputError(f"--via tensorflow: tf2onnx 1.17 exports up to opset 18, not {opset}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise BadInputError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}: below 18 ReduceL2 (GRN) cannot "
                            "be exported; 20 is the newest opset the exporters and onnxruntime 1.32 agree on")
    reason = why_unavailable(via)
    if reason:
        raise MissingDependencyError(reason)
    dest = check_destination(path, overwrite)
    data_dest = dest.with_name(data_file_name(dest))
    ckpt.validate(f"exporting {dest}")
    size = int(check_size or ckpt.preprocessing.input_size)
    if size % STRIDE:
        raise BadInputError(f"check size {size} is not a multiple of {STRIDE}")
    # The file the user exported from when we have it; else the source the checkpoint records.
    source_sha256 = sha256_of(source_path) if source_path else ckpt.source.sha256
    say = log or (lambda _msg: None)

    # The graph holds float32 weights (float16 with --fp16) whatever the checkpoint's dtype.
    weight_bytes = ckpt.parameter_count * (2 if fp16 else 4)
    if external_data is False and weight_bytes > EXTERNAL_DATA_THRESHOLD:
        raise BadInputError(f"--no-external-data: the model holds {weight_bytes / 1e9:.2f} GB of weights and a "
                            "protobuf file stops at 2 GB; let the weights go to the .data file")
    external = external_data if external_data is not None else weight_bytes > EXTERNAL_DATA_THRESHOLD

    say(f"exporting through {via} (opset {opset}{', fp16' if fp16 else ''}{', features' if features else ''})")
    proto = _BUILDERS[via](ckpt, opset, dynamic_hw, features, fp16, size)
    _finish_proto(proto, ckpt, via, opset, fp16, features, dynamic_hw, source_sha256)

    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        data = _save_proto(proto, work, dest.name, external)
        del proto
        model_file = work / dest.name
        say(f"checking {dest.name}: onnx.checker, then onnxruntime (ORT_ENABLE_ALL) vs the float64 referee")
        check = check_file(model_file, ckpt, size=size, batch=check_batch, fp16=fp16)
        if not check["ok"]:
            raise CheckFailedError(f"{dest}: exported graph fails parity, nothing written: {check['message']}")
        for file in (data, model_file):
            if file is not None:
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.chmod(file, 0o666 & ~_umask())
        # Data first: a model file in place always finds its complete data file.
        if data is not None:
            os.replace(data, data_dest)
        os.replace(model_file, dest)
        if data is None and overwrite and data_dest.exists():
            data_dest.unlink()  # the file we replaced had external data; the new one does not
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(dest, data_dest if external else None, via, opset, output_names(ckpt, features), check)


# ------------------------------------------------------------------------------------------- checking


def ort_session(path: str | os.PathLike[str], threads: int = 0) -> Any:
    """onnxruntime at ORT_ENABLE_ALL: the level whose BiasGelu fusion once broke ConvNeXt V2 (facts §6)."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("checking an ONNX file needs onnxruntime: pip install 'convnextv2-toolkit[onnx]'") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_ort(session: Any, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(outputs, {name: np.ascontiguousarray(images_nchw, dtype=np.float32)}),
                    strict=True))


# The parity harness's float32 rule (docs/parity.md), used by the export gate too: within 2x the PyTorch float32
# scale-aware error, but never below 2**-20 (about eight float32 ulps at the output's scale), where the ratio of
# two maxima that are each a few ulps is noise rather than a verdict.
FP32_FACTOR = 2.0
FP32_FLOOR = 2.0 ** -20


def parity(candidate: np.ndarray, fp32: np.ndarray, referee: np.ndarray) -> dict[str, Any]:
    """Scale-aware comparison against the float64 referee with the PyTorch float32 error as the yardstick."""
    err = float(np.max(np.abs(candidate.astype(np.float64) - referee)))
    floor = float(np.max(np.abs(fp32.astype(np.float64) - referee)))
    scale = float(np.max(np.abs(referee))) or 1.0
    tolerance = max(FP32_FACTOR * floor / scale, FP32_FLOOR)
    result: dict[str, Any] = {"max_abs": err, "torch_fp32_max_abs": floor, "ratio": err / floor if floor else None,
                              "scale_aware": err / scale, "tolerance_scale_aware": tolerance,
                              "within": err / scale <= tolerance}
    if referee.ndim == 2 and referee.shape[1] > 1:
        result["top1_same"] = bool(np.array_equal(candidate.argmax(1), referee.argmax(1)))
    return result


def check_file(path: Path, ckpt: Checkpoint, *, size: int, batch: int = 4, seed: int = 0,
               fp16: bool = False) -> dict[str, Any]:
    """onnx.checker, then onnxruntime vs the float64 PyTorch referee; ``ok`` is the parity verdict."""
    import onnx

    from convnextv2 import reference
    from convnextv2.parity_tests.quick import seeded_images

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        return {"ok": False, "message": f"onnx.checker: {exc}"}
    images = seeded_images(batch, size, seed)
    # One model alive at a time: Huge is 5.3 GB in float64.
    referee = reference.run_features(reference.build(ckpt, "torch", dtype="float64"), "torch", images)
    gc.collect()
    fp32 = reference.run_features(reference.build(ckpt, "torch"), "torch", images)
    gc.collect()
    got = run_ort(ort_session(path), images)
    gc.collect()
    per_output = {name: parity(value, fp32[name], referee[name]) for name, value in got.items() if name in referee}
    final = "logits" if "logits" in got else "pooled"
    if final not in per_output:
        return {"ok": False, "message": f"the graph has no {final!r} output (outputs: {sorted(got)})"}
    verdict = per_output[final]
    if fp16:
        ok = verdict["scale_aware"] <= FP16_TOLERANCE
        bar = f"fp16 bar: scale-aware error <= {FP16_TOLERANCE}"
    else:
        ok = verdict["within"] and verdict.get("top1_same", True)
        bar = ("bar: <= 2x the PyTorch float32 error vs the same referee (scale-aware, floor 2^-20), "
               "top-1 identical")
    message = (f"{final}: max|d| {verdict['max_abs']:.3e} vs float64 referee, PyTorch float32 {verdict['torch_fp32_max_abs']:.3e}"
               + (f" (ratio {verdict['ratio']:.2f})" if verdict["ratio"] is not None else "")
               + (f", top-1 {'identical' if verdict.get('top1_same', True) else 'DIFFERENT'}") + f"; {bar}")
    return {"ok": bool(ok), "message": message, "images": [batch, 3, size, size], "outputs": per_output}
