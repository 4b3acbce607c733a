"""A TensorRT engine (``.engine`` / ``.plan``) as an artifact, where it can run: an NVIDIA GPU, the ``tensorrt``
package and PyTorch's CUDA build (its tensors hold the engine's buffers). An engine is tied to the GPU and the
TensorRT version that built it; one that does not deserialize here is unavailable, with TensorRT's own words.

Written against TensorRT 10's tensor API (``num_io_tensors``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). No GPU was available where it was written, so it has not been run: on a GPU machine,
``parity_tests/test_artifact_runner.py`` builds an engine from a torch.onnx graph and judges it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np


def nvidia_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def why_unavailable() -> str | None:
    if not nvidia_gpu():
        return "a TensorRT engine needs an NVIDIA GPU and TensorRT (no NVIDIA GPU here)"
    if importlib.util.find_spec("tensorrt") is None:
        return "a TensorRT engine needs TensorRT: pip install tensorrt (the version that built it)"
    import torch

    if not torch.cuda.is_available():
        return "running a TensorRT engine here uses PyTorch's CUDA build for its buffers; this torch has no CUDA"
    return None


class _Log:
    """TensorRT's logger, keeping its errors: a refused engine is explained in TensorRT's own words."""

    def __init__(self, trt: Any) -> None:
        self.errors: list[str] = []

        class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
            def log(inner, severity: Any, message: str) -> None:  # noqa: N805
                if severity <= trt.ILogger.Severity.ERROR:
                    self.errors.append(message)

        self.logger = Logger()


def load_engine(path: Path) -> tuple[Any, Any]:
    """(tensorrt module, deserialized engine); ``RuntimeError`` with TensorRT's reason when it will not load."""
    import tensorrt as trt

    log = _Log(trt)
    engine = trt.Runtime(log.logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise RuntimeError("TensorRT cannot deserialize it here (built for another GPU or TensorRT version?): "
                           + ("; ".join(log.errors) or "no reason given"))
    return trt, engine


def io_tensors(trt: Any, engine: Any) -> tuple[list[tuple[str, list[int | None], str]], list[tuple[str, list[int | None], str]]]:
    """(inputs, outputs) as (name, shape with None for a dynamic dimension, numpy dtype name)."""
    inputs, outputs = [], []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        shape = [int(d) if d >= 0 else None for d in engine.get_tensor_shape(name)]
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append((name, shape, dtype))
    return inputs, outputs


def runner(trt: Any, engine: Any) -> Any:
    """A function feed -> outputs running the engine on the GPU, each call with its own input shapes."""
    import torch

    context = engine.create_execution_context()
    inputs, outputs = io_tensors(trt, engine)

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        held = {}
        for name, _, dtype in inputs:
            array = np.ascontiguousarray(feed[name], dtype=dtype)
            held[name] = torch.from_numpy(array).cuda()
            context.set_input_shape(name, tuple(array.shape))
            context.set_tensor_address(name, held[name].data_ptr())
        for name, _, dtype in outputs:
            shape = tuple(context.get_tensor_shape(name))
            held[name] = torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")
            context.set_tensor_address(name, held[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT's execute_async_v3 failed")
        stream.synchronize()
        return {name: held[name].cpu().numpy() for name, _, _ in outputs}

    return run
