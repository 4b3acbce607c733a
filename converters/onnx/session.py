"""onnxruntime sessions on an ONNX file: at the full optimisation level (how the export gate and the parity
harness run a graph, converters/runners) or with every optimisation off (the graph as written)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

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
