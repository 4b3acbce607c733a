"""How a conversion proves itself.

* ``functional``: the source run by its own runtime (onnxruntime, transformers, timm) and the written output
  read back and run by its own, on the parity rule's seeded images, each judged against the float64 PyTorch
  referee of the source's tensors by the one parity rule (reference/parity_rule.py).
* ``onnx_import``: an ONNX graph run by onnxruntime with every graph optimisation off (so the graph is seen as
  written) against the PyTorch reference built from the tensors the reader recovered.

The runners import their framework (onnxruntime, transformers, timm, TensorFlow, JAX) inside the function.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.reference import parity_rule as rule
from convnextv2.reference.errors import BadInputError, CheckFailedError, MissingDependencyError

# Images per functional check: the ONNX export gate's number. The rule's baseline is a maximum over the batch;
# four images keep its spread within the rule's margin (docs/parity.md) at half the cost of the default eight.
VERIFY_BATCH = 4


# ------------------------------------------------------------------ runners: a file run by its own runtime

def _final(ckpt: Checkpoint) -> str:
    return "logits" if ckpt.config.num_classes > 0 else "pooled"


def ort_session_unoptimised(path: Path) -> Any:
    """onnxruntime with every graph optimisation off: the graph as written, not onnxruntime's rewrite of it."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("running an ONNX graph needs onnxruntime: pip install 'convnextv2-toolkit[onnx]'") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_input_size(path: Path) -> int | None:
    """The graph's static image size, when its input has one."""
    session = ort_session_unoptimised(path)
    shape = session.get_inputs()[0].shape
    if len(shape) != 4:
        return None
    nhwc = shape[3] == 3 and shape[1] != 3
    size = shape[1] if nhwc else shape[2]
    return size if isinstance(size, int) and size > 0 else None


def _run_onnx(path: Path, ckpt: Checkpoint, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort_session_unoptimised(path)
    given = session.get_inputs()[0]
    nhwc = len(given.shape) == 4 and given.shape[3] == 3 and given.shape[1] != 3
    x = np.ascontiguousarray(images.transpose(0, 2, 3, 1) if nhwc else images, dtype=np.float32)
    static_batch = given.shape[0] if isinstance(given.shape[0], int) and given.shape[0] > 0 else len(x)
    outputs = [o.name for o in session.get_outputs()]
    chunks = [session.run(outputs, {given.name: x[i:i + static_batch]}) for i in range(0, len(x), static_batch)]
    values = {name: np.concatenate([c[k] for c in chunks]) for k, name in enumerate(outputs)}
    final = _final(ckpt)
    if final in values:
        return {final: values[final]}
    # A foreign graph names its output as it likes ("output", "logits"); take the one of the final's width.
    width = ckpt.config.num_classes or ckpt.config.dims[-1]
    fitting = [v for v in values.values() if v.ndim == 2 and v.shape == (len(x), width)]
    if len(fitting) != 1:
        raise CheckFailedError(f"{path}: cannot tell which graph output is the {final} "
                               f"(outputs: {', '.join(f'{k} {list(v.shape)}' for k, v in values.items())})")
    return {final: fitting[0]}


def _hf_folder(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "config.json").is_file() else None


def _run_hf(path: Path, ckpt: Checkpoint, images: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    transformers = _import_peer("transformers")
    folder = _hf_folder(path)
    if folder is None:
        raise MissingDependencyError(f"{path}: no config.json beside the weights for transformers to load")
    cls = transformers.ConvNextV2ForImageClassification if ckpt.config.num_classes > 0 else transformers.ConvNextV2Model
    model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
    value = out.logits if ckpt.config.num_classes > 0 else out.pooler_output
    return {_final(ckpt): value.numpy()}


def _run_timm(path: Path, ckpt: Checkpoint, images: np.ndarray) -> dict[str, np.ndarray]:
    import torch
    from safetensors.torch import load_file

    timm = _import_peer("timm")
    weights = path / "model.safetensors" if path.is_dir() else path
    state = load_file(str(weights))
    conv_mlp = state["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4
    config = ckpt.config
    if config.variant != "custom":
        model = timm.create_model(f"convnextv2_{config.variant}", pretrained=False, num_classes=config.num_classes,
                                  conv_mlp=conv_mlp)
    else:
        from timm.models.convnext import ConvNeXt

        model = ConvNeXt(depths=config.depths, dims=config.dims, use_grn=True, ls_init_value=None,
                         num_classes=config.num_classes, conv_mlp=conv_mlp)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        value = model(x) if config.num_classes > 0 else model.forward_head(model.forward_features(x), pre_logits=True)
    return {_final(ckpt): value.numpy()}


def _run_savedmodel(path: Path, ckpt: Checkpoint, images: np.ndarray) -> dict[str, np.ndarray]:
    import tensorflow as tf

    from convnextv2.converters import savedmodel

    function = tf.saved_model.load(str(path)).signatures[savedmodel.SIGNATURE]
    out = function(**{savedmodel.INPUT_NAME: tf.constant(np.ascontiguousarray(images, dtype=np.float32))})
    return {_final(ckpt): np.asarray(out[savedmodel.output_name(ckpt)])}


def _run_reference(framework: str) -> Any:
    def run(path: Path, ckpt: Checkpoint, images: np.ndarray) -> dict[str, np.ndarray]:
        from convnextv2 import reference

        model = reference.build(ckpt, framework, dtype="float32")
        features = reference.run_features(model, framework, images.astype(np.float32))
        return {_final(ckpt): np.asarray(features[_final(ckpt)])}
    return run


# format -> (who runs a file of that format, runner). The formats without a runtime of their own (our canonical
# file, the original .pt, which the original code runs with the very PyTorch model we reference) are run by the
# reference of their framework.
RUNNERS: dict[str, tuple[str, Any]] = {
    "onnx": ("onnxruntime (graph optimisations off)", _run_onnx),
    "hf": ("transformers (PyTorch)", _run_hf),
    "timm": ("timm", _run_timm),
    "savedmodel": ("TensorFlow SavedModel", _run_savedmodel),
    "keras": ("Keras reference (reference/keras_model.py)", _run_reference("tensorflow")),
    "flax": ("Flax reference (reference/flax_model.py)", _run_reference("flax")),
    "canonical": ("PyTorch reference", _run_reference("torch")),
    "original": ("PyTorch reference", _run_reference("torch")),
}


def _import_peer(name: str) -> Any:
    os.environ.setdefault("USE_TF", "0")
    os.environ.setdefault("USE_FLAX", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import importlib

    from convnextv2.converters.peer_imports import import_torchvision_guarded

    import_torchvision_guarded()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(f"--verify runs this format with {name}, which is not installed: "
                                     f"pip install {name}") from exc


# ------------------------------------------------------------------ judging

class Judge:
    """The float64 referee and float32 baseline of one checkpoint on the seeded images, computed once."""

    def __init__(self, ckpt: Checkpoint, size: int, batch: int = VERIFY_BATCH, seed: int = rule.DEFAULT_SEED):
        started = time.perf_counter()
        self.ckpt, self.size = ckpt, size
        self.images = rule.seeded_images(batch, size, seed)
        final = _final(ckpt)
        self.referee = rule.referee_features(ckpt, self.images)[final]
        gc.collect()
        self.baseline = rule.baseline_features(ckpt, self.images, "float32")[final]
        gc.collect()
        self.seconds = time.perf_counter() - started

    def judge(self, features: dict[str, np.ndarray], runner: str, seconds: float) -> dict[str, Any]:
        final = _final(self.ckpt)
        value = np.asarray(features[final])
        if value.shape != self.referee.shape:
            return {"runner": runner, "passed": False, "seconds": round(seconds, 3),
                    "message": f"{final} has shape {list(value.shape)}, expected {list(self.referee.shape)}"}
        if not np.all(np.isfinite(value)):
            return {"runner": runner, "passed": False, "seconds": round(seconds, 3),
                    "message": f"{final} is not finite"}
        base_error = rule.scale_aware_error(self.baseline, self.referee)
        verdict = rule.judge(final, value, self.referee, base_error, "float32")
        return {"runner": runner, "feature": final, "max_abs": verdict.max_abs_error,
                "tolerance": verdict.threshold, "torch_float32_max_abs": rule.max_abs_error(self.baseline, self.referee),
                "passed": verdict.passed, "seconds": round(seconds, 3),
                "message": verdict.message or "within the float32 parity rule"}


def run_and_judge(judge: Judge, path: Path, format: str, ckpt: Checkpoint) -> dict[str, Any]:
    if format not in RUNNERS:
        raise BadInputError(f"--verify cannot run a {format} file")
    runner, function = RUNNERS[format]
    started = time.perf_counter()
    features = function(path, ckpt, judge.images)
    gc.collect()
    return judge.judge(features, runner, time.perf_counter() - started)


def check_size(ckpt: Checkpoint, path: Path, format: str) -> int:
    """The image size a check runs at: the graph's own when an ONNX graph fixes one, else the checkpoint's."""
    if format == "onnx":
        size = onnx_input_size(path)
        if size:
            return int(size)
    return int(ckpt.preprocessing.input_size)


def onnx_import(ckpt: Checkpoint, path: Path) -> dict[str, Any]:
    """The graph at ``path`` in onnxruntime (optimisations off) against the PyTorch reference of the tensors
    read from it; CheckFailedError when they disagree by the parity rule."""
    started = time.perf_counter()
    judge = Judge(ckpt, check_size(ckpt, path, "onnx"))
    result = run_and_judge(judge, path, "onnx", ckpt)
    result["referee_seconds"] = round(judge.seconds, 3)
    result["seconds"] = round(time.perf_counter() - started, 3)
    if not result["passed"]:
        raise CheckFailedError(f"{path}: the graph's function differs from the PyTorch reference built from the "
                               f"tensors read from it ({result['message']}); nothing written")
    return result


__all__ = ["RUNNERS", "VERIFY_BATCH", "Judge", "check_size", "onnx_import", "ort_session_unoptimised",
           "run_and_judge"]
