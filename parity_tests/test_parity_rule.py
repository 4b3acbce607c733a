"""The one parity rule (convnextv2.reference.parity_rule): inputs, metric, tolerance, verdict, baselines."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from convnextv2.fixtures import make_checkpoint
from convnextv2.reference import parity_rule as rule
from convnextv2.reference.errors import BadInputError

CONFIG = "custom:depths=1,1,2,1;dims=8,16,32,64"


def test_seeded_images_are_the_same_everywhere_and_checked():
    a = rule.seeded_images(2, 64, 3)
    assert a.dtype == np.float32 and a.shape == (2, 3, 64, 64)
    assert np.array_equal(a, rule.seeded_images(2, 64, 3)) and not np.array_equal(a, rule.seeded_images(2, 64, 4))
    for batch, size in ((0, 64), (1, 48), (1, 16)):
        with pytest.raises(BadInputError):
            rule.seeded_images(batch, size)


def test_scale_aware_error_and_tolerance():
    referee = np.array([[1.0, -4.0], [2.0, 0.0]])
    assert rule.scale_aware_error(referee + 0.01, referee) == pytest.approx(0.01 / 4.0)
    assert rule.scale_aware_error(np.full((2, 2), 0.5), np.zeros((2, 2))) == 0.5  # all-zero referee: absolute
    assert rule.tolerance(1e-6) == pytest.approx(max(rule.FACTOR * 1e-6, rule.FLOOR["float32"]))
    assert rule.tolerance(1e-3, "float16") == pytest.approx(rule.FACTOR * 1e-3)
    with pytest.raises(BadInputError):
        rule.tolerance(1e-6, "int8")
    assert rule.baseline_precision("float64") == "float32" and rule.baseline_precision("bfloat16") == "bfloat16"


def test_verdict_fails_on_error_and_on_a_separable_top1_flip_only():
    referee = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 2.0 + 1e-9]])
    assert not rule.verdict("logits", referee + 0.2, referee, 0.1).passed
    flipped = referee.copy()
    flipped[0] = [0.0, 0.74, 0.76]
    judged = rule.verdict("logits", flipped, referee, 0.3)
    assert not judged.passed and judged.real_flips == 1 and judged.message == "top-1 differs on 1 of 2 images"
    tie = referee.copy()
    tie[1] = [2.0, 0.0, 2.0 - 1e-9]
    judged = rule.verdict("logits", tie, referee, 1e-6)
    assert judged.passed and judged.top1_same.tolist() == [True, False]
    # Only logits have a top-1: a feature map is judged by its error alone.
    assert rule.verdict("pooled", flipped, referee, 0.3).passed


def test_baselines_at_every_precision_order_as_their_precision():
    ckpt = make_checkpoint(CONFIG, seed=1)
    images = rule.seeded_images(2, 64, 0)
    referee = rule.referee_features(ckpt, images)
    assert referee["logits"].dtype == np.float64
    errors = {dtype: rule.measure_baseline(ckpt, images, dtype, referee) for dtype in rule.PRECISIONS}
    assert errors["float64"] == errors["float32"]  # float64 candidates are measured against the float32 baseline
    for name in rule.FEATURES:
        # float32 ~1e-7, float16 (10-bit mantissa) ~1e-3, bfloat16 (7-bit) ~1e-2: each clearly its precision.
        assert 0 < errors["float32"][name] < 1e-5, name
        assert 10 * errors["float32"][name] < errors["float16"][name] < errors["bfloat16"][name] < 0.1, name
    features = rule.baseline_features(ckpt, images, "bfloat16")
    assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in features.values())


def test_the_rule_imports_numpy_only():
    code = ("import sys; import convnextv2.reference.parity_rule; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
