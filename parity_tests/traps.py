"""Known ConvNeXt V2 porting bugs (defaults of other frameworks that silently break parity), injected into a copy of the PyTorch reference so the harness can
prove it catches each one and names the stage where it first shows.

Each trap is a :class:`Trap`: a function that breaks a float32 PyTorch model in place, the feature where the
harness must first see it, and, where the bug is invisible on ordinary weights, a function that reshapes the
checkpoint so that it shows. ``trap_runtime(name)`` wraps a trap as a runtime the harness runs like any other.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.parity_tests.runtimes import Runtime


@dataclasses.dataclass(frozen=True)
class Trap:
    name: str
    description: str
    first_stage: str
    apply: Callable[[Any], None]
    expose: Callable[[Checkpoint], Checkpoint] | None = None


# ------------------------------------------------------------------ the bugs

def _spectral_grn(model: Any) -> None:
    """transformers 4.51: ``torch.linalg.norm(x, ord=2, dim=(1, 2))`` is the largest singular value of each
    H x W map, not the L2 norm of its entries."""
    import torch

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.matrix_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return torch.addcmul(self.beta + x, x * nx, self.gamma)

    for module in model.modules():
        if type(module).__name__ == "GRN":
            module.forward = types.MethodType(forward, module)


def _tanh_gelu(model: Any) -> None:
    """jax.nn.gelu / flax / keras.ops.gelu default to the tanh approximation."""
    import torch
    import torch.nn.functional as F

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = F.gelu(self.pwconv1(self.norm(y)), approximate="tanh")
        return x + self.pwconv2(self.grn(y)).permute(0, 3, 1, 2)

    for module in model.modules():
        if type(module).__name__ == "Block":
            module.forward = types.MethodType(forward, module)


def _final_eps(model: Any) -> None:
    """transformers' ``layer_norm_eps`` default, used only by the final pooled LayerNorm."""
    model.head.norm.eps = 1e-12


def _fast_variance_layer_norm(x: Any, weight: Any, bias: Any, eps: float) -> Any:
    import torch

    mean = x.mean(dim=-1, keepdim=True)
    # E[x^2] - E[x]^2 (Flax's use_fast_variance): cancels catastrophically when |mean| >> std.
    variance = torch.clamp((x * x).mean(dim=-1, keepdim=True) - mean * mean, min=0.0)
    return (x - mean) * torch.rsqrt(variance + eps) * weight + bias


def _fast_variance(model: Any) -> None:
    """Flax's LayerNorm default ``use_fast_variance=True``, in every LayerNorm of the model."""
    import torch

    def channels_last(self: Any, x: torch.Tensor) -> torch.Tensor:
        return _fast_variance_layer_norm(x, self.weight, self.bias, self.eps)

    def channels_first(self: Any, x: torch.Tensor) -> torch.Tensor:
        y = _fast_variance_layer_norm(x.permute(0, 2, 3, 1), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)

    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.forward = types.MethodType(channels_last, module)  # type: ignore[method-assign]
        elif type(module).__name__ == "LayerNorm2d":
            module.forward = types.MethodType(channels_first, module)


def _transposed_dwconv(model: Any) -> None:
    """A 7x7 depthwise kernel moved between layouts with H and W swapped (HWIO <-> OIHW slips)."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Block":
                module.dwconv.weight.copy_(module.dwconv.weight.transpose(-1, -2).contiguous())


def _bgr_stem(model: Any) -> None:
    """Images fed as BGR to a model trained on RGB (or the stem's input channels reversed by a converter)."""
    import torch

    with torch.no_grad():
        model.stem.conv.weight.copy_(model.stem.conv.weight.flip(1))


# ------------------------------------------------------------------ weights that make a bug visible

def _with_tensors(ckpt: Checkpoint, changes: dict[str, np.ndarray]) -> Checkpoint:
    tensors = dict(ckpt.tensors)
    tensors.update(changes)
    return dataclasses.replace(ckpt, tensors=tensors)


def expose_fast_variance(ckpt: Checkpoint, offset: float = 100.0) -> Checkpoint:
    """E[x^2] - E[x]^2 loses about eps32 * (mean / std)^2 of the variance. Fixture activations are centred
    (|mean| ~ std), where the fast formula is as good as the two-pass one and no test could see the bug.
    Real activations are not always centred: a large common bias on the stem convolution (here +100 on every
    output channel, std ~0.1) puts the stem LayerNorm's input at mean/std ~ 1e3, and the fast variance then
    loses a few per cent, while the two-pass referee and the float32 baseline lose ~1e-5."""
    bias = np.asarray(ckpt.tensors["stem.conv.bias"], dtype=np.float32) + np.float32(offset)
    return _with_tensors(ckpt, {"stem.conv.bias": bias})


def expose_final_eps(ckpt: Checkpoint, scale: float = 1e-3) -> Checkpoint:
    """eps only matters when the pooled features' variance over channels comes near it. Fixture features have
    variance ~1, where 1e-12 and 1e-6 differ by ~1e-6 relative: at the float32 floor. Shrinking the last
    stage's output by ``scale`` (its downsample convolution, and each block's depthwise bias and output
    projection, so every residual branch shrinks with the trunk) brings the variance to ~1e-6, the regime of
    weak or heavily regularised final features, where the two eps give visibly different pooled features."""
    changes = {}
    config = ckpt.config
    last = len(config.depths) - 1
    names = [f"stages.{last}.downsample.conv.weight", f"stages.{last}.downsample.conv.bias"]
    for block in range(config.depths[last]):
        prefix = f"stages.{last}.blocks.{block}"
        names += [f"{prefix}.dwconv.bias", f"{prefix}.pwconv2.weight", f"{prefix}.pwconv2.bias"]
    for name in names:
        changes[name] = np.asarray(ckpt.tensors[name], dtype=np.float32) * np.float32(scale)
    return _with_tensors(ckpt, changes)


def expose_gelu(ckpt: Checkpoint, preactivation_std: float = 2.0) -> Checkpoint:
    """tanh and erf GELU differ by up to ~5e-4 for |x| around 1-3 and by ~x**3/100 near zero. Fixture weights
    are at init scale (std 0.02), so the MLP's pre-activations are ~0.05 and the two forms agree to 1e-7.
    Trained networks have pre-activations of order 1: rescaling every ``pwconv1`` weight to std
    ``preactivation_std / sqrt(C)`` gives that (LayerNorm feeds it unit-variance inputs)."""
    changes = {}
    for name, value in ckpt.tensors.items():
        if name.endswith(".pwconv1.weight"):
            weight = np.asarray(value, dtype=np.float64)
            target = preactivation_std / np.sqrt(weight.shape[1])
            changes[name] = (weight * (target / weight.std())).astype(np.float32)
    return _with_tensors(ckpt, changes)


TRAPS: dict[str, Trap] = {trap.name: trap for trap in [
    Trap("grn-spectral-norm", "GRN with the spectral norm of each H x W map (transformers 4.51)", "stage1",
         _spectral_grn),
    Trap("gelu-tanh", "tanh-approximated GELU instead of the exact erf form", "stage1", _tanh_gelu,
         expose_gelu),
    Trap("final-ln-eps-1e-12", "final pooled LayerNorm with eps 1e-12 (transformers' default)", "pooled",
         _final_eps, expose_final_eps),
    Trap("fast-variance-layernorm", "LayerNorm variance as E[x^2] - E[x]^2 (Flax's default)", "stem",
         _fast_variance, expose_fast_variance),
    Trap("transposed-dwconv", "depthwise 7x7 kernels with H and W swapped", "stage1", _transposed_dwconv),
    Trap("bgr-stem", "stem fed BGR instead of RGB (input channels reversed)", "stem", _bgr_stem),
]}


# ------------------------------------------------------------------ reduced-precision traps

def _float16_norm_layer_norm(x: Any, weight: Any, bias: Any, eps: float) -> Any:
    # Mean and variance in the activations' own precision, as an fp16 engine that does not pin its norms does.
    # (torch's own CPU layer_norm would accumulate in float32 internally and hide the bug.)
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    variance = (centred * centred).mean(dim=-1, keepdim=True)
    return centred / (variance + eps).sqrt() * weight + bias


def _float16_norms(model: Any) -> None:
    """GRN's sum of squares over H x W and LayerNorm's variance computed in float16 (TensorRT's fp16 engines
    without per-layer precision, the failure of NVIDIA/TensorRT#1954): the sum overflows 65504 to inf and GRN
    turns every later activation into NaN."""
    import torch

    def grn(self: Any, x: torch.Tensor) -> torch.Tensor:
        gx = (x * x).sum(dim=(1, 2), keepdim=True).sqrt()
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return self.gamma * (x * nx) + self.beta + x

    def channels_last(self: Any, x: torch.Tensor) -> torch.Tensor:
        return _float16_norm_layer_norm(x, self.weight, self.bias, self.eps)

    def channels_first(self: Any, x: torch.Tensor) -> torch.Tensor:
        return _float16_norm_layer_norm(x.permute(0, 2, 3, 1), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)

    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.forward = types.MethodType(channels_last, module)  # type: ignore[method-assign]
        elif type(module).__name__ == "LayerNorm2d":
            module.forward = types.MethodType(channels_first, module)
        elif type(module).__name__ == "GRN":
            module.forward = types.MethodType(grn, module)


def expose_float16_overflow(ckpt: Checkpoint, preactivation_std: float = 40.0) -> Checkpoint:
    """GRN's sum of squares over an H x W map exceeds float16's 65504 once the map's rms exceeds
    256 / sqrt(H * W): 4.6 on a 56 x 56 map (224 px), common in trained MLPs, but 16 at the 16 x 16 map of a
    64 px test image, far above fixture activations (~0.05). MLP pre-activations of std ``preactivation_std``
    (the GELU output's rms about 0.6 of it) bring the small test to that regime; the float32-norm recipe is
    unaffected (its largest activation stays far below float16's range)."""
    return expose_gelu(ckpt, preactivation_std)


@dataclasses.dataclass(frozen=True)
class ReducedPrecisionTrap(Trap):
    dtypes: tuple[str, ...] = ("float16",)


# Traps that only exist at reduced precision: their runtime casts the whole model (norms included) to the
# run's dtype, as a naive fp16 deployment does, and then applies the bug.
REDUCED_PRECISION_TRAPS: dict[str, ReducedPrecisionTrap] = {trap.name: trap for trap in [
    ReducedPrecisionTrap("float16-norms", "GRN sum of squares and LayerNorm variance computed in float16",
                         "stage1", _float16_norms, expose_float16_overflow, dtypes=("float16",)),
]}


def trap_runtime(name: str) -> Runtime:
    """The PyTorch reference with one trap applied, as a runtime named ``torch-trap:<name>``: float32/float64
    for TRAPS; for REDUCED_PRECISION_TRAPS the model cast whole to the reduced dtype."""
    if name in REDUCED_PRECISION_TRAPS:
        return _reduced_trap_runtime(REDUCED_PRECISION_TRAPS[name])
    trap = TRAPS[name]

    def features(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        from convnextv2 import reference

        model = reference.build(ckpt, "torch", dtype=dtype)
        trap.apply(model)
        return reference.run_features(model, "torch", images.astype(dtype))

    return Runtime(f"torch-trap:{name}", "custom", f"PyTorch reference with a bug: {trap.description}", features,
                   requires=("torch",), extra="torch", dtypes=("float32", "float64"))


def _reduced_trap_runtime(trap: ReducedPrecisionTrap) -> Runtime:
    def features(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        import torch

        from convnextv2 import reference
        from convnextv2.reference import torch_model

        torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        model = torch_model.contiguous_copy(reference.build(ckpt, "torch")).to(torch_dtype)
        trap.apply(model)
        with torch.inference_mode():
            out = model.forward_features(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(torch_dtype))
        return {key: np.ascontiguousarray(value.float().numpy()) for key, value in out.items()}

    return Runtime(f"torch-trap:{trap.name}", "custom", f"PyTorch reference with a bug: {trap.description}",
                   features, requires=("torch",), extra="torch", dtypes=trap.dtypes)
