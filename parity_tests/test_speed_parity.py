"""The float32 fast path of the PyTorch reference (channels-last, fused GRN) keeps parity.

Yardstick, measured in the same run on the same images: the same model run through the plain formulation
(``torch_model.FAST_FLOAT32 = False``: NCHW, GRN term by term, as before the speed work) in float32. The fast
path's error against the float64 referee must pass the one parity rule (convnextv2.reference.parity_rule) with
the plain path's error as the yardstick, feature by feature, with the same top-1. The float64 referee never
takes the fast path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convnextv2 import reference
from convnextv2.fixtures import make_checkpoint
from convnextv2.reference import parity_rule, torch_model
from convnextv2.reference.parity_rule import seeded_images
from convnextv2.reference.variants import VARIANTS

pytestmark = pytest.mark.torch


def _run(ckpt, dtype: str, fast: bool, images: np.ndarray) -> dict[str, np.ndarray]:
    previous = torch_model.FAST_FLOAT32
    torch_model.FAST_FLOAT32 = fast
    try:
        model = reference.build(ckpt, "torch", dtype=dtype)
        if fast and dtype == "float32":
            # The fast path is really the one measured: conv weights are stored channels-last.
            assert model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
        return reference.run_features(model, "torch", images)
    finally:
        torch_model.FAST_FLOAT32 = previous


def _check(variant: str, size: int, batch: int) -> None:
    ckpt = make_checkpoint(variant, seed=0, fmt="canonical")
    images = seeded_images(batch, size)
    referee = _run(ckpt, "float64", True, images)
    plain64 = _run(ckpt, "float64", False, images)
    fast = _run(ckpt, "float32", True, images)
    plain = _run(ckpt, "float32", False, images)
    assert set(fast) == set(plain) == set(referee)
    for name, expected in referee.items():
        # The referee is the plain definition whatever the switch says.
        assert np.array_equal(expected, plain64[name]), f"{name}: the float64 referee changed with the fast path"
        # The one parity rule with the plain float32 path as the yardstick.
        plain_err = parity_rule.scale_aware_error(plain[name], expected)
        verdict = parity_rule.judge(name, fast[name], expected, plain_err)
        assert verdict.passed, (
            f"{variant}@{size} {name}: fast float32 error {verdict.scale_aware_error:.3e} > the rule's tolerance "
            f"{parity_rule.tolerance(plain_err):.3e} (plain float32 error {plain_err:.3e})")
        assert fast[name].shape == expected.shape and fast[name].flags.c_contiguous
    if "logits" in referee:
        assert np.array_equal(fast["logits"].argmax(1), referee["logits"].argmax(1))


@pytest.mark.parametrize("variant", ["atto", "tiny"])
def test_fast_float32_path_keeps_parity_small(variant):
    _check(variant, 64, 2)


def test_fast_path_is_float32_only():
    """float64 (the referee) always runs the plain formulation; so do exported graphs (checked at trace time)."""
    assert torch_model._fast_path(torch.zeros(1, dtype=torch.float32))
    assert not torch_model._fast_path(torch.zeros(1, dtype=torch.float64))


def test_fused_linears_run_in_inference_only():
    """The oneDNN fused linears (no autograd formula) are taken under inference mode on a CPU build with oneDNN,
    and never with gradients on, so the parity checks above measure them and training still differentiates."""
    x = torch.zeros(1, dtype=torch.float32)
    assert not torch_model._fused_linears(x)
    with torch.inference_mode():
        assert torch_model._fused_linears(x) == torch.backends.mkldnn.is_available()
        assert not torch_model._fused_linears(x.double())


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_float32_path_keeps_parity_every_size(variant):
    _check(variant, 224, 2 if variant in ("large", "huge") else 4)
