"""The quantization rule: how an int8 artifact is judged against the float64 PyTorch referee.

An int8 artifact cannot meet the float rule (docs/parity.md "Tolerance": 6x the float32 baseline); its error is
the quantization noise itself. It is judged instead, stage by stage in forward order, by

    SQNR (dB)        10 log10( sum ref^2 / sum (x - ref)^2 ), per image, the worst image
    cosine           cosine similarity of the flattened feature, per image, the worst image

against the referee's features of the stages the artifact exposes (the final output always), and on the final
logits by top-1 agreement (fraction of images whose top-1 class is the referee's) and top-5 agreement (mean
fraction of the referee's top-5 classes in the artifact's top 5). A headless checkpoint's final output is the
pooled features: no top-k.

The limits are derived in the same run, as the float16 rule's are: ``int8_yardstick`` quantizes the checkpoint
here (the float64 PyTorch reference, per-output-channel symmetric int8 weights in every Conv2d and Linear,
per-tensor asymmetric uint8 inputs to them calibrated on seeded images of their own, norms and GRN in float) and
its metrics on the same images are the yardstick. A stage passes when its SQNR is at most
THRESHOLDS["sqnr_margin_db"] below the yardstick's and its cosine distance at most THRESHOLDS["cosine_margin_db"]
above it; the logits also when top-1 / top-5 agreement are at most their margins below the yardstick's. Noise
accumulates with depth and with the weights' spread, and the yardstick accumulates it too, so one margin holds
from atto to tiny where no fixed dB threshold did. The first stage outside a margin is where the artifact first
diverges. The margins were chosen by the sweep (benchmarks/quant_sweep.py; the table and why these numbers are in
docs/parity.md, "Quantized artifacts").

Importing this module imports numpy only (torch inside int8_yardstick).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError

# Margins against the int8 yardstick (int8_yardstick), chosen by the sweep (docs/parity.md "Quantized artifacts",
# benchmarks/results/quant_sweep.json). A stage passes when its SQNR is at most ``sqnr_margin_db`` below the
# yardstick's and its cosine distance (1 - cosine) at most ``cosine_margin_db`` dB above the yardstick's; the
# logits when top-1 / top-5 agreement is at most the margin below the yardstick's.
THRESHOLDS: dict[str, float] = {
    "sqnr_margin_db": 7.0,
    "cosine_margin_db": 7.0,
    "top1_margin": 0.5,
    "top5_margin": 0.3,
}
CALIBRATION_SEED = 1000  # the yardstick's calibration images: seeded, distinct from the judged ones (seed 0)
# As many as the sweep's quantizers were calibrated on. Min/max ranges widen with more images (tiny's yardstick
# logits: 16.7 dB on 8 images, 13.9 on 16), so the yardstick is calibrated as the artifacts it judges usually are.
CALIBRATION_IMAGES = 16
# A feature reproduced exactly has no noise: its SQNR is reported as this (JSON has no infinity).
SQNR_CAP_DB = 200.0


# ------------------------------------------------------------------ the metrics

def _per_image(value: np.ndarray, referee: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    actual = np.asarray(value, dtype=np.float64)
    expected = np.asarray(referee, dtype=np.float64)
    return actual.reshape(len(actual), -1), expected.reshape(len(expected), -1)


def sqnr_db(value: np.ndarray, referee: np.ndarray) -> float:
    """Worst per-image signal-to-quantization-noise ratio in dB, capped at SQNR_CAP_DB (an exact image); an
    all-zero referee image with any noise counts as -SQNR_CAP_DB."""
    actual, expected = _per_image(value, referee)
    signal = np.sum(expected * expected, axis=1)
    noise = np.sum((actual - expected) ** 2, axis=1)
    worst = SQNR_CAP_DB
    for s, n in zip(signal, noise, strict=True):
        if n == 0:
            continue
        db = 10.0 * math.log10(s / n) if s > 0 else -SQNR_CAP_DB
        worst = min(worst, max(db, -SQNR_CAP_DB))
    return float(worst)


def cosine(value: np.ndarray, referee: np.ndarray) -> float:
    """Worst per-image cosine similarity of the flattened feature (the float rule's own metric)."""
    actual, expected = _per_image(value, referee)
    return parity_rule._cosine(actual, expected)


def top_k_agreement(logits: np.ndarray, referee: np.ndarray, k: int) -> float:
    """k = 1: the fraction of images whose top-1 class is the referee's; k > 1: the mean fraction of the
    referee's top-k classes found in the artifact's top k."""
    ours = parity_rule._top_k(np.asarray(logits, dtype=np.float64), k)
    theirs = parity_rule._top_k(np.asarray(referee, dtype=np.float64), k)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ours, theirs, strict=True)]))


# ------------------------------------------------------------------ the yardstick

def _fake_quantize_weights(weight: Any) -> None:
    """Per-output-channel symmetric int8 (narrow range, -127..127), rounded back to float in place."""
    import torch

    with torch.no_grad():
        amax = weight.abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        weight.copy_(torch.clamp(torch.round(weight / scale), -127, 127) * scale)


def _uint8_grid(low: float, high: float) -> tuple[float, float]:
    """Per-tensor asymmetric uint8 over [min(low, 0), max(high, 0)] (zero exact, as every quantizer does it):
    (scale, zero point)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 if high > low else 1.0
    return scale, float(np.clip(round(-low / scale), 0, 255))


def int8_yardstick(ckpt: Any, images: np.ndarray, *, calibration_seed: int = CALIBRATION_SEED,
                   calibration_images: int = CALIBRATION_IMAGES, chunk: int = 4) -> dict[str, np.ndarray]:
    """The features of a plain int8 quantization of ``ckpt`` on ``images``, made here in PyTorch: the float64
    reference with every Conv2d and Linear (stem, downsample, dwconv, pwconv1, pwconv2, head) given
    per-output-channel symmetric int8 weights and per-tensor asymmetric uint8 inputs, their ranges the min/max
    over ``calibration_images`` seeded images (``calibration_seed``, distinct from the judged ones); LayerNorm,
    GELU and GRN stay in float. An artifact is judged against the noise this recipe makes on the same images
    (THRESHOLDS are margins against it), so the rule scales with depth and weights as the float16 rule does."""
    import torch
    from torch import nn

    from convnextv2 import reference

    images = np.asarray(images)
    model = reference.build(ckpt, "torch", dtype="float64")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ranges = {id(m): [math.inf, -math.inf] for m in layers}

    def observe(module: Any, args: tuple[Any, ...]) -> None:
        seen = ranges[id(module)]
        seen[0], seen[1] = min(seen[0], float(args[0].min())), max(seen[1], float(args[0].max()))

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        parts = []
        with torch.inference_mode():
            for start in range(0, len(batch), chunk):
                inputs = torch.from_numpy(np.ascontiguousarray(batch[start:start + chunk], dtype=np.float64))
                parts.append({k: v.numpy().copy() for k, v in model.forward_features(inputs).items()})
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    handles = [m.register_forward_pre_hook(observe) for m in layers]
    rng = np.random.default_rng(calibration_seed)
    run(rng.standard_normal((calibration_images, *images.shape[1:]), dtype=np.float32))
    for handle in handles:
        handle.remove()
    grids = {key: _uint8_grid(*seen) for key, seen in ranges.items()}

    def quantize_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        scale, zero = grids[id(module)]
        q = torch.clamp(torch.round(args[0] / scale) + zero, 0, 255)
        return ((q - zero) * scale, *args[1:])

    for module in layers:
        _fake_quantize_weights(module.weight)
        module.register_forward_pre_hook(quantize_input)
    return run(images)


# ------------------------------------------------------------------ the verdict

@dataclasses.dataclass
class StageJudgement:
    """One stage of a quantized artifact: its metrics, the yardstick's, and whether they are within the margins."""

    name: str
    status: str  # pass | fail
    shape: list[int] | None = None
    sqnr_db: float | None = None
    cosine: float | None = None
    max_abs_error: float | None = None
    referee_max_abs: float | None = None
    message: str = ""


@dataclasses.dataclass
class QuantizedVerdict:
    """An int8 artifact against the referee: pass | fail, the first failing stage in forward order (None when
    it passes), why, the judgement of every stage it exposes, and ``metrics`` (the report's JSON entry)."""

    status: str
    first_failing: str | None
    reason: str
    stages: list[StageJudgement]
    metrics: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def measure(produced: Mapping[str, np.ndarray], referee: parity_rule.Referee) -> dict[str, Any]:
    """SQNR and cosine of every stage ``produced`` has (finite and of the referee's shape), top-1 / top-5
    agreement on its logits: {"sqnr_db": {stage: dB}, "cosine": {stage: c}, "top1_agreement", "top5_agreement"}."""
    found: dict[str, Any] = {"sqnr_db": {}, "cosine": {}, "top1_agreement": None, "top5_agreement": None}
    for name in referee.names:
        value = produced.get(name)
        if value is None or np.shape(value) != referee.features[name].shape or not np.all(np.isfinite(value)):
            continue
        found["sqnr_db"][name] = sqnr_db(value, referee.features[name])
        found["cosine"][name] = cosine(value, referee.features[name])
        if name == "logits":
            found["top1_agreement"] = top_k_agreement(value, referee.features[name], 1)
            found["top5_agreement"] = top_k_agreement(value, referee.features[name], 5)
    return found


def _cosine_floor(yardstick_cos: float, margin_db: float) -> float:
    """The lowest cosine within ``margin_db`` of the yardstick's cosine distance (1 - cosine)."""
    return 1.0 - (1.0 - yardstick_cos) * 10 ** (margin_db / 10)


def stage_problems(name: str, measured: Mapping[str, float | None], yardstick: Mapping[str, float | None],
                   thresholds: Mapping[str, float] | None = None) -> list[str]:
    """What one stage breaks of the margins against the yardstick (default THRESHOLDS); empty when it passes.
    ``measured`` / ``yardstick``: "sqnr_db", "cosine" and, for the logits, "top1_agreement" / "top5_agreement"
    (None or absent: not judged). The one place the margins are applied."""
    limits = {**THRESHOLDS, **(thresholds or {})}
    problems = []
    sqnr, floor_db = measured.get("sqnr_db"), yardstick.get("sqnr_db")
    if sqnr is not None and floor_db is not None and sqnr < floor_db - limits["sqnr_margin_db"]:
        problems.append(f"SQNR {sqnr:.1f} dB < {floor_db - limits['sqnr_margin_db']:.1f} dB "
                        f"(int8 yardstick {floor_db:.1f} dB - {limits['sqnr_margin_db']:g})")
    cos, yard_cos = measured.get("cosine"), yardstick.get("cosine")
    if cos is not None and yard_cos is not None and cos < _cosine_floor(yard_cos, limits["cosine_margin_db"]):
        problems.append(f"cosine {cos:.4f} < {_cosine_floor(yard_cos, limits['cosine_margin_db']):.4f} "
                        f"(int8 yardstick {yard_cos:.4f}, 1 - cosine at most {limits['cosine_margin_db']:g} dB "
                        f"above it)")
    if name == "logits":
        for k, key, margin in ((1, "top1_agreement", "top1_margin"), (5, "top5_agreement", "top5_margin")):
            got, yard = measured.get(key), yardstick.get(key)
            if got is not None and yard is not None and got < yard - limits[margin]:
                problems.append(f"top-{k} agreement {got:.2f} < {yard - limits[margin]:.2f} "
                                f"(int8 yardstick {yard:.2f} - {limits[margin]:g})")
    return problems


def _stage_metrics(found: Mapping[str, Any], name: str) -> dict[str, float | None]:
    got = {"sqnr_db": found["sqnr_db"].get(name), "cosine": found["cosine"].get(name)}
    if name == "logits":
        got.update(top1_agreement=found["top1_agreement"], top5_agreement=found["top5_agreement"])
    return got


def _judge_stage(name: str, value: np.ndarray, referee: np.ndarray, found: Mapping[str, Any],
                 yard: Mapping[str, Any], limits: Mapping[str, float]) -> StageJudgement:
    value = np.asarray(value)
    if value.shape != referee.shape:
        return StageJudgement(name, "fail", list(value.shape),
                              message=f"shape {tuple(value.shape)}, referee {tuple(referee.shape)}")
    if not np.all(np.isfinite(value)):
        return StageJudgement(name, "fail", list(value.shape), message="non-finite values")
    result = StageJudgement(name, "pass", list(value.shape), found["sqnr_db"][name], found["cosine"][name],
                            parity_rule.max_abs_error(value, referee), parity_rule.feature_scale(referee))
    problems = stage_problems(name, _stage_metrics(found, name), _stage_metrics(yard, name), limits)
    if problems:
        result.status, result.message = "fail", "; ".join(problems)
    else:
        yard_db = yard["sqnr_db"].get(name)
        result.message = f"SQNR {result.sqnr_db:.1f} dB (int8 yardstick {yard_db:.1f} dB), " \
                         f"cosine {result.cosine:.4f}"
    return result


def judge_quantized(produced: Mapping[str, np.ndarray], referee: parity_rule.Referee,
                    yardstick: Mapping[str, np.ndarray], thresholds: Mapping[str, float] | None = None,
                    ) -> QuantizedVerdict:
    """Judge an int8 artifact's features (``produced``: stage name -> array in the referee's layout; the stages
    it does not expose are left out) against the referee, within the margins of ``yardstick`` (int8_yardstick's
    features on the referee's images). The final output (logits, or pooled for a headless checkpoint) must be
    there."""
    limits = {**THRESHOLDS, **(thresholds or {})}
    names = referee.names
    if not names:
        raise BadInputError("the referee holds no features to judge a quantized artifact against")
    final = "logits" if "logits" in names else names[-1]
    if produced.get(final) is None:
        raise BadInputError(f"a quantized artifact is judged on its final output at least: {final!r} is missing "
                            f"(found {', '.join(sorted(produced)) or 'nothing'})")
    missing = [name for name in names if name in produced and name not in yardstick]
    if missing:
        raise BadInputError(f"the int8 yardstick has no {', '.join(missing)} to judge the artifact's against")
    found, yard = measure(produced, referee), measure(yardstick, referee)
    stages = [_judge_stage(name, produced[name], referee.features[name], found, yard, limits)
              for name in names if produced.get(name) is not None]
    failed = [s for s in stages if s.status == "fail"]
    metrics = {**found, "yardstick_sqnr_db": {s.name: yard["sqnr_db"].get(s.name) for s in stages},
               "yardstick_cosine": {s.name: yard["cosine"].get(s.name) for s in stages},
               "yardstick_top1_agreement": yard["top1_agreement"] if final == "logits" else None,
               "yardstick_top5_agreement": yard["top5_agreement"] if final == "logits" else None,
               "thresholds": dict(limits)}
    metrics["sqnr_db"] = {s.name: s.sqnr_db for s in stages}
    metrics["cosine"] = {s.name: s.cosine for s in stages}
    if failed:
        first = failed[0]
        return QuantizedVerdict("fail", first.name, f"int8 rule: {first.name} {first.message}", stages, metrics)
    return QuantizedVerdict("pass", None, "", stages, metrics)


def feature_results(judged: QuantizedVerdict, referee: parity_rule.Referee) -> list[parity_rule.FeatureResult]:
    """The verdict's stages as the float rule's FeatureResults (for a parity_rule.Verdict), one per referee
    feature in forward order: a stage the artifact does not expose is ``not-exposed``. The SQNR and the
    thresholds are in ``message``; the tolerance fields stay empty (there is no scale-aware tolerance)."""
    judged_by_name = {stage.name: stage for stage in judged.stages}
    results = []
    for name in referee.names:
        stage = judged_by_name.get(name)
        if stage is None:
            results.append(parity_rule.FeatureResult(name, "not-exposed", message="this artifact does not expose it"))
            continue
        scale_aware = None
        if stage.max_abs_error is not None and stage.referee_max_abs is not None:
            scale_aware = stage.max_abs_error / stage.referee_max_abs if stage.referee_max_abs > 0 \
                else stage.max_abs_error
        result = parity_rule.FeatureResult(name, stage.status, shape=stage.shape, max_abs_error=stage.max_abs_error,
                                           referee_max_abs=stage.referee_max_abs, scale_aware_error=scale_aware,
                                           cosine_similarity=stage.cosine, message=stage.message)
        if name == "logits":
            result.top1_agreement = judged.metrics["top1_agreement"]
            result.top5_overlap = judged.metrics["top5_agreement"]
        results.append(result)
    return results
