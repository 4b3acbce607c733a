"""The ONNX export gate: onnx.checker, then onnxruntime at the full optimisation level against the float64
PyTorch referee, judged by the one parity rule (convnextv2.reference.parity_rule; docs/parity.md).

A float32 export is held to the float32 rule (yardstick: the PyTorch float32 reference on the same images); a
``--fp16`` export to the float16 rule (yardstick: the PyTorch reference run in float16 with its norms in float32,
the same recipe the float16 export uses).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.reference import parity_rule as rule
from convnextv2.reference.errors import MissingDependencyError


def ort_session(path: str | os.PathLike[str], threads: int = 0, optimise: bool = True) -> Any:
    """onnxruntime at ORT_ENABLE_ALL (the level whose BiasGelu fusion once broke ConvNeXt V2); with
    ``optimise=False`` every graph optimisation off: the graph as written, not onnxruntime's rewrite of it."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError as exc:
        doing = "checking an ONNX file" if optimise else "running an ONNX graph"
        raise MissingDependencyError(f"{doing} needs onnxruntime: pip install 'convnextv2-toolkit[onnx]'") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
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


def parity(candidate: np.ndarray, baseline: np.ndarray, referee: np.ndarray, dtype: str = "float32",
           name: str = "logits") -> dict[str, Any]:
    """One output of a candidate against the float64 referee, with ``baseline`` (the PyTorch reference at the
    rule's baseline precision for ``dtype``) as the yardstick: the rule's verdict and its numbers."""
    referee = np.asarray(referee, dtype=np.float64)
    base_error = rule.scale_aware_error(baseline, referee)
    judged = rule.judge(name, candidate, referee, base_error, dtype)
    base_abs = rule.max_abs_error(baseline, referee)
    result: dict[str, Any] = {
        "max_abs": judged.max_abs_error, "torch_baseline_max_abs": base_abs, "baseline_dtype": rule.baseline_precision(dtype),
        "ratio": judged.max_abs_error / base_abs if base_abs else None, "scale_aware": judged.scale_aware_error,
        "tolerance_scale_aware": rule.tolerance(base_error, dtype),
        "within": judged.max_abs_error <= judged.threshold, "passed": judged.passed}
    if judged.top1_same is not None:
        result["top1_same"] = bool(judged.top1_same.all())
        result["top1_real_flips"] = judged.real_flips
    return result


def check_file(path: Path, ckpt: Checkpoint, *, size: int, batch: int = rule.DEFAULT_BATCH, seed: int = rule.DEFAULT_SEED,
               fp16: bool = False) -> dict[str, Any]:
    """onnx.checker, then onnxruntime vs the float64 PyTorch referee; ``ok`` is the parity rule's verdict."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        return {"ok": False, "message": f"onnx.checker: {exc}"}
    dtype = "float16" if fp16 else "float32"
    images = rule.seeded_images(batch, size, seed)
    # One model alive at a time: Huge is 5.3 GB in float64.
    referee = rule.referee_features(ckpt, images)
    gc.collect()
    baseline = rule.baseline_features(ckpt, images, rule.baseline_precision(dtype))
    gc.collect()
    got = run_ort(ort_session(path), images)
    gc.collect()
    per_output = {name: parity(value, baseline[name], referee[name], dtype, name)
                  for name, value in got.items() if name in referee}
    final = "logits" if "logits" in got else "pooled"
    if final not in per_output:
        return {"ok": False, "message": f"the graph has no {final!r} output (outputs: {sorted(got)})"}
    verdict = per_output[final]
    ok = all(v["passed"] for v in per_output.values())
    failing = [name for name, v in per_output.items() if not v["passed"]]
    bar = f"bar: the {dtype} parity rule ({rule.describe(dtype)}; docs/parity.md)"
    message = (f"{final}: max|d| {verdict['max_abs']:.3e} vs float64 referee, PyTorch {verdict['baseline_dtype']} "
               f"{verdict['torch_baseline_max_abs']:.3e}"
               + (f" (ratio {verdict['ratio']:.2f})" if verdict["ratio"] is not None else "")
               + (f", top-1 {'identical' if verdict.get('top1_same', True) else 'DIFFERENT'}")
               + (f"; failing: {', '.join(failing)}" if failing else "") + f"; {bar}")
    return {"ok": bool(ok), "message": message, "images": [batch, 3, size, size], "outputs": per_output}
