"""The harness's parts: tolerance rule, metrics, localisation, input pipeline, plugin options."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from convnextv2.converters.checkpoint import Preprocessing
from convnextv2.fixtures import make_checkpoint
from convnextv2.parity_tests.harness import FEATURES, parse_tolerances, run_parity
from convnextv2.parity_tests.inputs import preprocess_file, resize_numpy, resize_plan
from convnextv2.parity_tests.plugin import parse_shard, shard_of
from convnextv2.parity_tests.runtimes import Runtime
from convnextv2.reference import parity_rule as rule
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.parity_rule import Tolerance, compare_feature

CONFIG = "custom:depths=1,1,2,1;dims=8,16,32,64"


def test_derived_tolerance_is_the_parity_rule():
    t = Tolerance("float32")
    assert t.threshold(1e-6, 10.0) == pytest.approx(rule.FACTOR * 1e-6 * 10.0)
    assert t.threshold(1e-9, 10.0) == pytest.approx(max(rule.FACTOR * 1e-9, rule.FLOOR["float32"]) * 10.0)
    # float64: the float32 baseline scaled by eps64/eps32, never below the float64 floor.
    assert Tolerance("float64").threshold(1e-7, 1.0) == pytest.approx(
        max(rule.FACTOR * 1e-7 * rule.EPS_RATIO["float64"], rule.FLOOR["float64"]))
    assert Tolerance("float64").threshold(0.0, 1.0) == rule.FLOOR["float64"] > 0
    explicit = Tolerance("float32", atol=1e-3, rtol=1e-2)
    assert explicit.threshold(1e-6, 10.0) == pytest.approx(1e-3 + 1e-1)
    assert Tolerance("float32", atol=1e-12, rtol=0.0).threshold(1.0, 1.0) == pytest.approx(1e-12)


def test_tolerance_options_per_dtype():
    every = ("float32", "float64", "bfloat16", "float16")
    assert parse_tolerances(["1e-5"], "--atol") == dict.fromkeys(every, 1e-5)
    assert parse_tolerances(["float64=1e-12", "1e-5"], "--atol") == {**dict.fromkeys(every, 1e-5), "float64": 1e-12}
    assert parse_tolerances(["float64=1e-12", "float16=1e-2"], "--atol") == {"float64": 1e-12, "float16": 1e-2}
    for bad in (["x"], ["int8=1"], ["-1"], ["nan"]):
        with pytest.raises(BadInputError):
            parse_tolerances(bad, "--atol")


def test_top1_flip_fails_unless_the_referee_cannot_separate_the_classes():
    referee = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 2.0 + 1e-9]])
    flipped = referee.copy()
    flipped[0] = [0.0, 0.74, 0.76]  # error 0.26, within the 0.3 tolerance, but the classes are 0.5 apart
    result = compare_feature("logits", flipped, referee, 0.15 / rule.FACTOR, Tolerance("float32"))  # x scale 2
    assert result.tolerance_abs == pytest.approx(0.3)
    assert result.status == "fail" and result.message == "top-1 differs on 1 of 2 images"
    tie = referee.copy()
    tie[1] = [2.0, 0.0, 2.0 - 1e-9]  # flips a tie the referee itself cannot separate at this tolerance
    result = compare_feature("logits", tie, referee, 1e-6, Tolerance("float32"))
    assert result.status == "pass" and result.top1_agreement == 0.5
    assert result.top5_overlap == 1.0


def test_metrics_shape_and_nonfinite_failures():
    ref = np.ones((2, 3))
    assert compare_feature("pooled", np.ones((2, 4)), ref, 1e-7, Tolerance("float32")).status == "fail"
    bad = ref.copy()
    bad[0, 0] = np.nan
    assert compare_feature("pooled", bad, ref, 1e-7, Tolerance("float32")).status == "fail"
    result = compare_feature("pooled", -ref, ref, 1e-7, Tolerance("float32"))
    assert result.cosine_similarity == pytest.approx(-1.0) and result.scale_aware_error == pytest.approx(2.0)
    assert compare_feature("pooled", None, ref, 1e-7, Tolerance("float32")).status == "not-exposed"


def _fake_runtime(name, break_from=None, exposes=FEATURES, fail=None):
    """The float32 reference, optionally perturbed from one feature on (as a real bug propagates)."""

    def features(ckpt, images, dtype):
        from convnextv2 import reference

        if fail is not None:
            raise fail
        out = reference.run_features(reference.build(ckpt, "torch", dtype=dtype), "torch", images.astype(dtype))
        if break_from is not None:
            for feature in FEATURES[FEATURES.index(break_from):]:
                out[feature] = out[feature] * np.float32(1.001)
        return {k: v for k, v in out.items() if k in exposes}

    return Runtime(name, "custom", "test double", features, requires=("torch",))


@pytest.mark.torch
def test_first_divergence_unavailable_error_and_not_exposed_are_reported():
    ckpt = make_checkpoint(CONFIG, seed=2)
    runtimes = [
        _fake_runtime("clean"),
        _fake_runtime("broken-at-stage3", break_from="stage3"),
        _fake_runtime("partial", exposes=("stage4", "logits")),
        Runtime("missing", "custom", "needs a module that is not there", lambda *a: {},
                requires=("convnextv2_no_such_module",), extra="tf"),
        _fake_runtime("crashing", fail=RuntimeError("boom")),
    ]
    report = run_parity(ckpt, runtimes, image_size=64, batch=2)
    assert report.result("clean").status == "pass"
    broken = report.result("broken-at-stage3")
    assert broken.status == "fail" and broken.first_divergence == "stage3"
    partial = report.result("partial")
    assert partial.status == "pass"
    assert [f.name for f in partial.features if f.status == "not-exposed"] == ["stem", "stage1", "stage2", "stage3",
                                                                             "pooled"]
    missing = report.result("missing")
    assert missing.status == "unavailable"
    assert missing.reason.startswith("runtime missing is not available: convnextv2_no_such_module is not installed")
    assert "convnextv2-toolkit[tf]" in missing.reason
    crashing = report.result("crashing")
    assert crashing.status == "error" and "boom" in crashing.reason
    assert report.exit_code == 1
    assert {r.name for r in report.failures()} == {"broken-at-stage3", "crashing"}


@pytest.mark.torch
def test_float64_runs_use_the_scaled_rule_and_explicit_override():
    ckpt = make_checkpoint(CONFIG, seed=2)
    report = run_parity(ckpt, ["torch"], dtypes=["float32", "float64"], image_size=64, batch=1)
    assert report.result("torch", "float64").status == "pass"
    f64 = report.result("torch", "float64").feature("logits")
    # The same float64 code as the referee; oneDNN may pick another kernel (summation order) between two
    # model instances, so a few float64 ulps are possible, never more.
    assert f64.scale_aware_error < 1e-14
    assert f64.tolerance_scale_aware < 1e-12
    strict = run_parity(ckpt, ["torch"], dtypes=["float32"], image_size=64, batch=1,
                        atol={"float32": 1e-12}, rtol={"float32": 0.0})
    assert strict.exit_code == 1 and strict.result("torch").first_divergence == "stem"


@pytest.mark.torch
def test_independent_referee_catches_a_loader_bug():
    """The matrix builds its referee from the in-memory fixture: weights corrupted on the way in are caught
    even though every runtime agrees with the (corrupted) checkpoint."""
    good = make_checkpoint(CONFIG, seed=2)
    tensors = dict(good.tensors)
    tensors["stages.2.blocks.1.grn.gamma"] = tensors["stages.2.blocks.1.grn.gamma"][::-1].copy()
    corrupted = dataclasses.replace(good, tensors=tensors)
    report = run_parity(corrupted, ["torch"], referee_ckpt=good, image_size=64, batch=2)
    assert report.result("torch").first_divergence == "stage3"


# ------------------------------------------------------------------ inputs

def test_numpy_resampler_matches_pillow():
    Image = pytest.importorskip("PIL.Image", reason="Pillow is in the images extra")
    rng = np.random.default_rng(0)
    for h, w, new_h, new_w in [(100, 80, 40, 37), (30, 50, 64, 96), (257, 300, 224, 261)]:
        pixels = rng.random((h, w, 3))
        ours = resize_numpy(pixels, new_h, new_w, "bicubic")
        theirs = np.stack([np.asarray(Image.fromarray(pixels[..., c].astype(np.float32), mode="F").resize(
            (new_w, new_h), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
        assert np.max(np.abs(ours - theirs)) < 1e-5


def test_npy_images_without_pillow_match_the_pillow_path(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "a.npy"
    np.save(path, (rng.random((90, 120, 3)) * 255).astype(np.uint8))
    pre = Preprocessing()
    without = preprocess_file(path, pre, 64, use_pillow=False)
    assert without.shape == (3, 64, 64) and without.dtype == np.float32
    with_pillow = preprocess_file(path, pre, 64, use_pillow=True)
    assert np.max(np.abs(without - with_pillow)) < 1e-4
    with pytest.raises(BadInputError, match="needs Pillow"):
        preprocess_file(tmp_path / "b.png", pre, 64, use_pillow=False)


def test_resize_plan_follows_timm():
    pre = Preprocessing(input_size=224, crop_pct=0.875)
    assert resize_plan(480, 640, pre, 224) == (256, 341)
    assert resize_plan(640, 480, pre, 224) == (341, 256)
    squash = Preprocessing.for_resolution(384)
    assert resize_plan(480, 640, squash, 384) == (384, 384)


@pytest.mark.peers
def test_image_pipeline_matches_timm_transforms(tmp_path):
    """timm's eval transform (torchvision on Pillow) is the independent oracle for resize, crop, normalise."""
    from PIL import Image

    from convnextv2.converters.runners.peers import import_timm

    timm = import_timm()
    from timm.data import create_transform

    rng = np.random.default_rng(2)
    path = tmp_path / "photo.png"
    Image.fromarray((rng.random((150, 200, 3)) * 255).astype(np.uint8)).save(path)
    pre = Preprocessing(input_size=96, crop_pct=0.875)
    ours = preprocess_file(path, pre, 96)
    transform = create_transform(input_size=(3, 96, 96), crop_pct=0.875, interpolation="bicubic",
                                 mean=pre.mean, std=pre.std)
    with Image.open(path) as image:
        theirs = transform(image.convert("RGB")).numpy()
    assert timm is not None and ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) < 1e-5


# ------------------------------------------------------------------ plugin

def test_shards_partition_the_tests():
    ids = [f"parity_tests/test_parity_matrix.py::test_size_case[{i}]" for i in range(200)]
    shards = [shard_of(i, 3) for i in ids]
    assert set(shards) == {1, 2, 3}
    assert shards == [shard_of(i, 3) for i in ids]  # stable
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) is None
    for bad in ("0/3", "4/3", "x", "1/0"):
        with pytest.raises(pytest.UsageError):
            parse_shard(bad)
