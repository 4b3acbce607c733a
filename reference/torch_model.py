"""ConvNeXt V2 in PyTorch. ``state_dict()`` keys are exactly the canonical names (reference/schema.py).

Numerics follow the original definition (facebookresearch/ConvNeXt-V2): exact erf GELU, every LayerNorm with eps 1e-6 and
biased variance, GRN's L2 norm over H and W per image and channel with eps only in the denominator.
Runs in float64 too; that instance is the referee every runtime is compared against.

Two paths, one set of weights. float64 (the referee) runs the plain definition: NCHW tensors, GRN written
term by term. float32 runs the same math arranged for speed (docs/benchmarks.md): channels-last activations
end to end, so the NHWC blocks see contiguous memory and the permutes around them cost nothing; GRN's
``gamma * (x * N) + beta + x`` as one multiply-add ``x * (gamma * N + 1) + beta``; in CPU inference the two
linears as oneDNN GEMMs with bias + GELU and bias + residual fused in. parity_tests/test_speed_parity.py holds
the float32 path to the parity rule (docs/parity.md) with the plain path's float32 error as its baseline. Exported graphs trace
the plain path, except GRN, which exports in a form onnxruntime runs faster (``GRN._graph_form``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convnextv2.reference.features import BACKBONE_FEATURES
from convnextv2.reference.variants import GRN_EPS, LAYER_NORM_EPS, MLP_RATIO, NUM_STAGES, ModelConfig

FEATURE_NAMES = BACKBONE_FEATURES


# False runs float32 through the plain path too: the yardstick of parity_tests/test_speed_parity.py.
FAST_FLOAT32 = True


def _fast_path(x: torch.Tensor) -> bool:
    """float32 outside export: the referee (float64) and exported graphs keep the plain formulation."""
    return FAST_FLOAT32 and x.dtype == torch.float32 and not _exporting()


def _exporting() -> bool:
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN_LINEAR = _onednn_linear_available()


def _fused_linears(x: torch.Tensor) -> bool:
    """oneDNN's linear with its epilogue fused (bias + exact GELU, bias + residual add) on CPU inference.

    ``F.linear`` runs addmm, which first copies the broadcast bias into the output and then runs a separate
    GELU pass; oneDNN applies both while the GEMM tile is still in cache (measured on tiny's first stage, batch
    1: 1.4 ms against 3.9 ms). The fused op has no autograd formula, so it is used only with gradients off.
    """
    return _ONEDNN_LINEAR and _fast_path(x) and x.device.type == "cpu" and not torch.is_grad_enabled()


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, channels: int, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization on NHWC input; gamma/beta flat (4C,) as in the schema."""

    def __init__(self, channels: int, eps: float = GRN_EPS):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting() and x.dtype != torch.float64:
            return self._graph_form(x)
        # A vector norm over the flattened H*W, per image and channel: ord=2 over two dims of
        # torch.linalg.norm would be the spectral norm (the transformers 4.51 bug).
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        if _fast_path(x):
            # One pass over the activation instead of three: the per-image scale is (B, 1, 1, 4C).
            return torch.addcmul(self.beta, x, torch.addcmul(torch.ones_like(nx), nx, self.gamma))
        return torch.addcmul(self.beta + x, x * nx, self.gamma)

    def _graph_form(self, x: torch.Tensor) -> torch.Tensor:
        """The formulation exported graphs carry, arranged for onnxruntime (docs/onnx.md).

        onnxruntime's ReduceL2 over the two spatial axes of an NHWC tensor is a slow strided reduction (11-12%
        of tiny's run time); a row of ones times the squares, seen as (B, H*W, 4C), is a GEMV instead. The
        output is then one multiply-add, ``x * (gamma * N + 1) + beta``, as in the float32 fast path. Measured on
        tiny at 224 in onnxruntime 1.32, 2 threads: batch 8 502 ms against 565 ms, batch 1 90 ms against 100 ms.
        """
        batch, height, width, channels = x.shape
        squares = (x * x).reshape(batch, height * width, channels)
        ones = torch.ones(1, height * width, dtype=x.dtype, device=x.device)
        gx = torch.sqrt(torch.matmul(ones, squares)).reshape(batch, 1, 1, channels)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return torch.addcmul(self.beta, x, nx * self.gamma + 1)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.dwconv = nn.Conv2d(width, width, kernel_size=7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(width, MLP_RATIO * width)
        self.grn = GRN(MLP_RATIO * width)
        self.pwconv2 = nn.Linear(MLP_RATIO * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        if _fused_linears(y):
            # "none" selects the exact erf GELU (the tanh form would be "tanh").
            y = torch.ops.mkldnn._linear_pointwise(y, self.pwconv1.weight, self.pwconv1.bias, "gelu", [], "none")
            # Channels-last x seen as NHWC is a contiguous view: the residual is added in the GEMM's epilogue.
            y = torch.ops.mkldnn._linear_pointwise.binary(
                self.grn(y), x.permute(0, 2, 3, 1).contiguous(), self.pwconv2.weight, self.pwconv2.bias, "add")
            return y.permute(0, 3, 1, 2)
        y = F.gelu(self.pwconv1(y), approximate="none")
        y = self.pwconv2(self.grn(y))
        return x + y.permute(0, 3, 1, 2)


class Stem(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.norm = LayerNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Downsample(nn.Module):
    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        self.norm = LayerNorm2d(in_width)
        self.conv = nn.Conv2d(in_width, out_width, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


class Stage(nn.Module):
    def __init__(self, in_width: int, width: int, depth: int, downsample: bool):
        super().__init__()
        self.downsample = Downsample(in_width, width) if downsample else None
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class Head(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.dims[-1]
        self.norm = nn.LayerNorm(width, eps=config.head_norm_eps) if config.head_norm else None
        self.fc = nn.Linear(width, config.num_classes) if config.num_classes > 0 else None


class ConvNeXtV2(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dims = config.dims
        self.stem = Stem(dims[0])
        self.stages = nn.ModuleList(
            Stage(dims[max(i - 1, 0)], dims[i], config.depths[i], downsample=i > 0) for i in range(NUM_STAGES)
        )
        self.head = Head(config)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected NCHW input with 3 channels, got shape {tuple(x.shape)}")
        if x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"input height and width must be divisible by 32, got {tuple(x.shape[2:])}")

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if _fast_path(x):
            # NHWC in memory from the first layer on: every block's permute to NHWC is then a free view.
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        if self.head.norm is not None:
            pooled = self.head.norm(pooled)
        return pooled

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every intermediate the parity harness compares: stem, stage1..stage4 (NCHW), pooled, logits."""
        x = self._prepare(x)
        features: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        features["stem"] = x
        for index, stage in enumerate(self.stages):
            x = stage(x)
            features[f"stage{index + 1}"] = x
        features["pooled"] = self.pool(x)
        if self.head.fc is not None:
            features["logits"] = self.head.fc(features["pooled"])
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, or pooled features for a headless model."""
        x = self._prepare(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        pooled = self.pool(x)
        return self.head.fc(pooled) if self.head.fc is not None else pooled


class Float32Norm(nn.Module):
    """A norm run in float32 inside a reduced-precision model: GRN's sum of squares over H x W overflows
    float16 (TensorRT fp16 breaks on GRN this way) and LayerNorm's variance loses its digits, so deployment
    runtimes and our float16 export keep both in float32 and round only their outputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        return self  # the model's .half() / .to(dtype) must not round the norms' own weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


def with_float32_norms(model: nn.Module) -> nn.Module:
    """Wrap every LayerNorm and GRN of ``model`` (in place) in :class:`Float32Norm`; cast the model after."""
    norm_types = (nn.LayerNorm, LayerNorm2d, GRN)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, norm_types):
                setattr(parent, child_name, Float32Norm(child))
    return model


def load_canonical(model: ConvNeXtV2, tensors: Mapping[str, np.ndarray]) -> ConvNeXtV2:
    """Copy canonical tensors into the model, cast to the model's dtype; strict on names and shapes."""
    dtype = next(model.parameters()).dtype
    state = {
        name: torch.from_numpy(np.array(array, dtype=np.float64 if dtype == torch.float64 else np.float32))
        for name, array in tensors.items()
        if not name.startswith("extras.")
    }
    model.load_state_dict(state, strict=True)
    return model


def export_canonical(model: ConvNeXtV2) -> dict[str, np.ndarray]:
    return {name: value.detach().cpu().numpy().copy() for name, value in model.state_dict().items()}


def build_torch(config: ModelConfig, tensors: Mapping[str, np.ndarray], dtype: str = "float32") -> ConvNeXtV2:
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    model = ConvNeXtV2(config).to(torch_dtype)
    load_canonical(model, tensors)
    if torch_dtype == torch.float32 and FAST_FLOAT32:
        # Convolution weights in the activations' memory format: oneDNN then runs them without reorders.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch stubs
    return model.eval()


def contiguous_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every weight in the default (NCHW, contiguous) memory format: where every
    PyTorch export path (ONNX, ExecuTorch) starts.

    ``build_torch`` keeps float32 convolution weights channels-last for oneDNN. torch.export records that dim
    order on the graph's parameters, and ExecuTorch then refuses it: XNNPACK lowering stops with "Expected
    p_stem_conv_weight to be NCHW in channels last reshape pass", and the portable runtime fails on the mixed
    dim orders. A copy, so the caller's fast model keeps its layout.
    """
    import copy

    clone = copy.deepcopy(model)
    clone.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # missing from torch stubs
    return clone


def run_features(model: ConvNeXtV2, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
    """Framework-neutral entry point shared by every reference: numpy NCHW in, numpy features out
    (stem/stage1..stage4 NCHW, pooled (B, C3), logits (B, K) when there is a head), in the model's dtype."""
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        features = model.forward_features(torch.from_numpy(np.ascontiguousarray(images_nchw)).to(dtype))
    # Channels-last maps come back as NCHW-ordered, C-contiguous arrays like every other runtime's.
    return {name: np.ascontiguousarray(value.numpy()) for name, value in features.items()}
