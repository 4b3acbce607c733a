"""onnxruntime as runners: on the torch ONNX export of a checkpoint (every stage an output, through the cache) or
on an ONNX file at the full optimisation level (where onnxruntime's BiasGelu fusion has broken ConvNeXt V2
exports before, facebookresearch/ConvNeXt-V2 issue #68); and a file as written (every graph optimisation off),
whatever its layout and output names."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.runners.base import RunContext, Runner, RunnerRecord
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import CheckFailedError
from convnextv2.reference.features import final_feature


@contextlib.contextmanager
def onnx_graph(ckpt: Checkpoint, size: int, fp16: bool, context: RunContext) -> Iterator[Path]:
    """The torch export with every stage as an output (model.onnx in the folder yielded), through the cache:
    onnxruntime and OpenVINO read the same graph, so one run exports it once."""
    from convnextv2.converters.onnx import export as onnx_export

    parts = {"checkpoint": context.cache.digest(ckpt), "size": size, "features": True, "fp16": fp16, "via": "torch",
             "opset": onnx_export.DEFAULT_OPSET["torch"]}
    with context.artifact("onnx", parts, lambda folder: onnx_export.write(
            ckpt, folder / "model.onnx", size=size, features=True, fp16=fp16)) as folder:
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


class OnnxAsWrittenRunner(Runner):
    """A graph made anywhere, seen as written: NCHW or NHWC input, any static batch, the final output found by
    name or by width."""

    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        from convnextv2.converters.onnx.session import ort_session

        assert self.file is not None, "this runner opens a file"
        path, ckpt = self.file.path, self.checkpoint
        session = ort_session(path, optimise=False)
        given = session.get_inputs()[0]
        nhwc = len(given.shape) == 4 and given.shape[3] == 3 and given.shape[1] != 3
        x = np.ascontiguousarray(images.transpose(0, 2, 3, 1) if nhwc else images, dtype=np.float32)
        static_batch = given.shape[0] if isinstance(given.shape[0], int) and given.shape[0] > 0 else len(x)
        outputs = [o.name for o in session.get_outputs()]
        chunks = [session.run(outputs, {given.name: x[i:i + static_batch]}) for i in range(0, len(x), static_batch)]
        values = {name: np.concatenate([c[k] for c in chunks]) for k, name in enumerate(outputs)}
        final = final_feature(ckpt.config)
        if final in values:
            return {final: values[final]}
        # A foreign graph names its output as it likes ("output", "logits"); take the one of the final's width.
        width = ckpt.config.num_classes or ckpt.config.dims[-1]
        fitting = [v for v in values.values() if v.ndim == 2 and v.shape == (len(x), width)]
        if len(fitting) != 1:
            raise CheckFailedError(f"{path}: cannot tell which graph output is the {final} "
                                   f"(outputs: {', '.join(f'{k} {list(v.shape)}' for k, v in values.items())})")
        return {final: fitting[0]}


def input_size(path: Path) -> int | None:
    """The graph's static image size, when its input has one."""
    from convnextv2.converters.onnx.session import ort_session

    shape = ort_session(path, optimise=False).get_inputs()[0].shape
    if len(shape) != 4:
        return None
    nhwc = shape[3] == 3 and shape[1] != 3
    size = shape[1] if nhwc else shape[2]
    return size if isinstance(size, int) and size > 0 else None


RECORDS = (
    RunnerRecord("onnxruntime", "runtime", "onnxruntime on the ONNX export (converters/onnx/export.py)",
                 aliases=("onnx", "ort"),
                 requires=("torch", "onnx", "onnxruntime", "onnxscript"), extra="onnx", worker="onnx-export",
                 precisions=("float32", "float16"), opens=("onnx",)),
    RunnerRecord("onnxruntime-as-written", "artifact", "onnxruntime (graph optimisations off)",
                 requires=("onnxruntime",), extra="onnx", worker="onnx-export", opens=("onnx",)),
)
