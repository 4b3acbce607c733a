"""A checkpoint's float16 headroom on given inputs: how close each stage's activations and the sums its norms form
come to float16's largest value, 65504, measured in a float64 PyTorch run with forward hooks.

A float16 build computes GRN's sum of squares over H x W and LayerNorm's variance (and, written naively, the mean
of squares) in float16 before their square roots; past 65504 they are inf and the model's output NaN, while every
activation on its own still fits. Per stage (stem, stage1..stage4, pooled; logits when there is a head):

    peak_abs                  max |x| over every op's input and output in the stage
    grn_sum_of_squares        max over images and channels of sum_{H,W} x^2 at GRN's input
    layernorm_variance        max over positions of the (biased) variance over channels at a LayerNorm's input
    layernorm_mean_square     max over positions of the mean of x^2 over channels at a LayerNorm's input
    float16_max               65504, for comparison

Importing this module imports numpy only; torch is imported inside the function that runs the reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convnextv2.reference.features import FEATURES

FLOAT16_MAX = float(np.finfo(np.float16).max)
QUANTITIES = ("peak_abs", "grn_sum_of_squares", "layernorm_variance", "layernorm_mean_square")
# Every feature: the logits' entry holds the classifier's peak only.
STAGES = FEATURES


def float16_headroom(ckpt: Any, images: np.ndarray) -> dict[str, dict[str, float]]:
    """Per stage, the quantities of the module docstring on ``images`` (NCHW, normalised), each a max over the
    stage's ops and the images; 0.0 where a stage has no such op (no GRN in the stem)."""
    import torch
    from torch import nn

    from convnextv2 import reference
    from convnextv2.reference.torch_model import GRN, LayerNorm2d

    model = reference.build(ckpt, "torch", dtype="float64")
    stats: dict[str, dict[str, float]] = {}

    def keep(stage: str, quantity: str, value: float) -> None:
        entry = stats.setdefault(stage, {name: 0.0 for name in QUANTITIES} | {"float16_max": FLOAT16_MAX})
        entry[quantity] = max(entry[quantity], value)

    def hook(stage: str) -> Any:
        def observe(module: Any, inputs: Any, output: Any) -> None:
            x = inputs[0].detach()
            keep(stage, "peak_abs", float(max(x.abs().max(), output.detach().abs().max())))
            if isinstance(module, GRN):  # NHWC: the sum over H and W per image and channel
                keep(stage, "grn_sum_of_squares", float((x * x).sum(dim=(1, 2)).max()))
            elif isinstance(module, (nn.LayerNorm, LayerNorm2d)):
                axis = 1 if isinstance(module, LayerNorm2d) else -1
                keep(stage, "layernorm_variance", float(x.var(dim=axis, unbiased=False).max()))
                keep(stage, "layernorm_mean_square", float((x * x).mean(dim=axis).max()))
        return observe

    handles = []
    watched = (nn.Conv2d, nn.Linear, nn.LayerNorm, LayerNorm2d, GRN)
    regions = list(zip(STAGES, [model.stem, *model.stages, model.head.norm, model.head.fc], strict=True))
    for stage, region in regions:
        if region is None:
            continue
        for module in region.modules():
            if isinstance(module, watched):
                handles.append(module.register_forward_hook(hook(stage)))
    try:
        features = reference.run_features(model, "torch", np.asarray(images))
    finally:
        for handle in handles:
            handle.remove()
    del model, torch
    # Block outputs (the residual sums) and the pooled mean are no module's input or output here.
    for stage in STAGES:
        if stage in features:
            keep(stage, "peak_abs", float(np.max(np.abs(features[stage]))))
    return {stage: stats[stage] for stage in STAGES if stage in stats}


def over_float16(headroom: dict[str, dict[str, float]]) -> list[str]:
    """The quantities at or past 65504, as "stage3 grn_sum_of_squares 1.2e+05": what a float16 build must keep in
    float32."""
    return [f"{stage} {name} {value:.3g}" for stage, entry in headroom.items()
            for name, value in entry.items() if name in QUANTITIES and value >= FLOAT16_MAX]
