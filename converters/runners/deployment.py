"""The deployment runtimes as runners: OpenVINO (CPU, precision hint pinned), the LiteRT interpreter and
ExecuTorch (XNNPACK delegate), each on its export of a checkpoint (every stage an output, through the cache) or
on a file of its format, loaded from the file as a user loads it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from convnextv2.converters.runners.base import Runner, RunnerRecord
from convnextv2.converters.runners.onnxruntime_runner import onnx_graph, stage_features
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import PrecisionUnavailableError
from convnextv2.reference.features import final_feature


class OpenVinoRunner(Runner):
    """An IR compiled on the CPU with INFERENCE_PRECISION_HINT pinned to the precision and read back: a plugin
    that settles on another precision makes the runner unavailable at it rather than judged at the wrong one. On a
    checkpoint at float32 the plugin's default compile runs too, so the report shows what a user who passes no hint
    gets. One IR (converted from the torch ONNX export) serves every precision: the hint is a compile option."""

    ran_at: str | None = None

    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        with self.context.phase("import"):
            import openvino

            from convnextv2.converters import openvino as openvino_format
        ckpt = self.checkpoint
        size = int(images.shape[-1])
        with contextlib.ExitStack() as stack:
            if self.file is not None:
                path = self.file.path
            else:
                def afresh(folder: Path) -> None:
                    with onnx_graph(ckpt, size, False, self.context) as onnx_path:
                        openvino_format.write_from_onnx(ckpt, onnx_path, folder / "model.xml", features=True,
                                                        size=size)

                def build(folder: Path) -> None:
                    # The architecture's IR with these weights in its .bin, proven; or converted afresh.
                    self.context.timings.artifacts["openvino"] = openvino_format.write_ir_template(
                        ckpt, folder, self.context.cache, features=True, size=size, afresh=lambda: afresh(folder))

                with self.context.phase("export"):
                    folder = stack.enter_context(self.context.artifact(
                        "openvino", {"checkpoint": self.context.cache.digest(ckpt), "size": size, "features": True},
                        build))
                path = folder / "model.xml"
            with self.context.phase("compile"):
                compiled, self.ran_at = openvino_format.compile_ir(path, precision)
            if self.ran_at != precision:
                raise PrecisionUnavailableError(
                    f"OpenVINO's CPU plugin here runs {self.ran_at} when asked for {precision} "
                    f"(INFERENCE_PRECISION_HINT={openvino_format.PRECISION_HINTS[precision]})")
            with self.context.phase("forward"):
                features = openvino_format.run(compiled, images)
            del compiled
            note = (f"OpenVINO {openvino.get_version().split('-')[0]} CPU, INFERENCE_PRECISION_HINT="
                    f"{openvino_format.PRECISION_HINTS[precision]}: ran at {self.ran_at} (read back)")
            if precision == "float32" and self.file is None:
                with self.context.phase("default compile"):
                    default, default_precision = openvino_format.compile_ir(path, None)
                    final = final_feature(ckpt.config)
                    moved = parity_rule.scale_aware_error(openvino_format.run(default, images)[final], features[final])
                note += (f"; without a hint it runs at {default_precision} here, {final} off the pinned run by "
                         f"{moved:.2e} scale-aware")
        return {**stage_features(features), parity_rule.DETAIL_KEY: np.asarray(note)}


class LiteRtRunner(Runner):
    """A .tflite (builtin ops) run by the LiteRT interpreter. On a checkpoint at float16: float16 weights, which
    LiteRT's CPU kernels dequantize."""

    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        with self.context.phase("import"):
            # The interpreter only: TensorFlow (the converter) is imported by the export, when the file is built.
            from convnextv2.converters import litert

        ckpt = self.checkpoint
        fp16 = precision == "float16"
        size = int(images.shape[-1])
        with contextlib.ExitStack() as stack:
            if self.file is not None:
                path = self.file.path
            else:
                with self.context.phase("export"):
                    parts = {"checkpoint": self.context.cache.digest(ckpt), "size": size, "features": True,
                             "fp16": fp16}
                    def build(folder: Path) -> None:
                        # The architecture's flatbuffer with these weights in its buffers, proven; or afresh.
                        self.context.timings.artifacts["litert"] = litert.write_with(
                            ckpt, folder / "model.tflite", self.context.cache, size=size, features=True, fp16=fp16)

                    folder = stack.enter_context(self.context.artifact("litert", parts, build))
                path = folder / "model.tflite"
            with self.context.phase("compile"):
                interpreter = litert.interpreter(path)
            with self.context.phase("forward"):
                features = litert.run(interpreter, images)
        note = f"{litert.interpreter_name()} interpreter, " + (
            "float16 weights dequantized to float32 at load" if fp16 else "float32")
        return {**stage_features(features), parity_rule.DETAIL_KEY: np.asarray(note)}


class ExecuTorchRunner(Runner):
    """A .pte (XNNPACK delegate) run by the ExecuTorch runtime, as a user loads it: from the file."""

    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        with self.context.phase("import"):
            # The runtime only: the exporter (executorch.exir) is imported by the export, when the program is built.
            import torch  # noqa: F401

            from convnextv2.converters import executorch
            from convnextv2.converters.onnx.interface import output_names
        ckpt = self.checkpoint
        size = int(images.shape[-1])
        if self.file is not None:
            return executorch.run_program(self.file.path, images, output_names(ckpt, features=False))

        def build(folder: Path) -> None:
            # The architecture's lowered program with these weights in its data segments, proven; or afresh.
            self.context.timings.artifacts["executorch"] = executorch.write_with(
                ckpt, folder / "model.pte", self.context.cache, size=size, features=True, metadata_exact=False)

        with contextlib.ExitStack() as stack:
            with self.context.phase("export"):
                folder = stack.enter_context(self.context.artifact(
                    "executorch", {"checkpoint": self.context.cache.digest(ckpt), "size": size, "features": True},
                    build))
            with self.context.phase("forward"):
                return executorch.run_program(folder / "model.pte", images, output_names(ckpt, features=True))


RECORDS = (
    RunnerRecord("executorch", "runtime", "ExecuTorch (XNNPACK delegate) on the .pte export (converters/executorch.py)",
                 requires=("torch", "executorch"), extra="executorch", worker="executorch", opens=("executorch",)),
    RunnerRecord("openvino", "runtime", "OpenVINO CPU on the IR export, precision hint pinned (converters/openvino.py)",
                 requires=("openvino", "torch", "onnx", "onnxscript"), extra="openvino", worker="onnx-export",
                 precisions=("float32", "bfloat16", "float16"), opens=("openvino",)),
    RunnerRecord("litert", "runtime", "LiteRT interpreter on the .tflite export (converters/litert.py)",
                 requires=("tensorflow", "ai_edge_litert"), extra="litert", worker="tensorflow",
                 precisions=("float32", "float16"), opens=("litert",)),
)
