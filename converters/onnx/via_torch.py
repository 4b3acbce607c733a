"""ONNX export of the PyTorch reference through ``torch.onnx`` (the torch.export-based exporter): the default
path, and the only one with ``--fp16`` and ``--features``."""

from __future__ import annotations

import importlib.util
from typing import Any

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.onnx.interface import INPUT_NAME, STRIDE, output_names
from convnextv2.reference.errors import MissingDependencyError


def why_unavailable() -> str | None:
    """The reason this path cannot run in this install, or None when it can."""
    missing = [m for m in ("torch", "onnxscript", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    return f"--via torch needs {', '.join(missing)}" if missing else None


def torch_module(ckpt: Checkpoint, features: bool, fp16: bool) -> Any:
    import torch
    from torch import nn

    from convnextv2 import reference
    from convnextv2.reference import torch_model

    model = torch_model.contiguous_copy(reference.build(ckpt, "torch"))
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

    wrapper = Exported().eval()
    if fp16:
        torch_model.with_float32_norms(wrapper).half()
    return wrapper


def build(ckpt: Checkpoint, opset: int, dynamic_hw: bool, features: bool, fp16: bool,
                 example_size: int) -> Any:
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("the torch export path needs PyTorch: pip install 'convnextv2-toolkit[torch,onnx]'") from exc
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("torch.onnx.export needs onnxscript: pip install 'convnextv2-toolkit[onnx]'") from exc

    module = torch_module(ckpt, features, fp16)
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
