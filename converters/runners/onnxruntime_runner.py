"""onnxruntime as runners: on the torch ONNX export of a checkpoint (every stage an output, through the cache) or
on an ONNX file at the full optimisation level (where onnxruntime's BiasGelu fusion has broken ConvNeXt V2
exports before, facebookresearch/ConvNeXt-V2 issue #68). A graph as written (every optimisation off, any
layout or output) is an artifact: converters/runners/artifact.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.runners.base import RunContext, Runner, RunnerRecord
from convnextv2.reference import parity_rule


@contextlib.contextmanager
def onnx_graph(ckpt: Checkpoint, size: int, fp16: bool, context: RunContext) -> Iterator[Path]:
    """The torch export with every stage as an output (model.onnx in the folder yielded), through the cache:
    onnxruntime and OpenVINO read the same graph, so one run exports it once."""
    from convnextv2.converters.onnx import export as onnx_export

    parts = {"checkpoint": context.cache.digest(ckpt), "size": size, "features": True, "fp16": fp16, "via": "torch",
             "opset": onnx_export.DEFAULT_OPSET["torch"]}
    def build(folder: Path) -> None:
        # The architecture's template with these weights written in and proven, or afresh (the note says why).
        context.timings.artifacts["onnx"] = onnx_export.write_with(
            ckpt, folder / "model.onnx", context.cache, size=size, features=True, fp16=fp16)

    with context.artifact("onnx", parts, build) as folder:
        yield folder / "model.onnx"


def stage_features(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: outputs[name] for name in parity_rule.FEATURES if name in outputs}


class OnnxRuntimeRunner(Runner):
    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        with self.context.phase("import"):
            import onnxruntime  # noqa: F401

            from convnextv2.converters.onnx import session as onnx_session
        if self.file is not None:
            return stage_features(onnx_session.run_ort(onnx_session.ort_session(self.file.path), images))
        with contextlib.ExitStack() as stack:
            with self.context.phase("export"):
                path = stack.enter_context(onnx_graph(self.checkpoint, int(images.shape[-1]), precision == "float16",
                                                      self.context))
            with self.context.phase("compile"):
                session = onnx_session.ort_session(path, threads=2)
            with self.context.phase("forward"):
                outputs = onnx_session.run_ort(session, images)
        return stage_features(outputs)


RECORDS = (
    RunnerRecord("onnxruntime", "runtime", "onnxruntime on the ONNX export (converters/onnx/export.py)",
                 aliases=("onnx", "ort"),
                 requires=("torch", "onnx", "onnxruntime", "onnxscript"), extra="onnx", worker="onnx-export",
                 precisions=("float32", "float16"), opens=("onnx",)),
)
