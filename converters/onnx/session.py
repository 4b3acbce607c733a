"""onnxruntime sessions on an ONNX file: at the full optimisation level (how the export gate and the parity
harness run a graph, converters/runners) or with every optimisation off (the graph as written)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from convnextv2.reference.errors import MissingDependencyError


def ort_session(path: str | os.PathLike[str] | bytes, threads: int = 0, optimise: bool = True,
                external_data_folder: str | os.PathLike[str] | None = None) -> Any:
    """onnxruntime at ORT_ENABLE_ALL (the level whose BiasGelu fusion once broke ConvNeXt V2); with
    ``optimise=False`` every graph optimisation off: the graph as written, not onnxruntime's rewrite of it.
    ``path`` may be a serialized model; ``external_data_folder`` is then where its external data lies."""
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
    if external_data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(external_data_folder))
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_ort(session: Any, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(outputs, {name: np.ascontiguousarray(images_nchw, dtype=np.float32)}),
                    strict=True))
