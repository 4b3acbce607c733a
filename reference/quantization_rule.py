"""The quantization rule: how an int8 artifact is judged against the float64 PyTorch referee.

An int8 artifact cannot meet the float rule (docs/parity.md "Tolerance": 6x the float32 baseline); its error is
the quantization noise itself. It is judged instead, stage by stage in forward order, by

    SQNR (dB)        10 log10( sum ref^2 / sum (x - ref)^2 ), per image, the worst image
    cosine           cosine similarity of the flattened feature, per image, the worst image

against the referee's features of the stages the artifact exposes (the final output always), and on the final
logits by top-1 agreement (fraction of images whose top-1 class is the referee's) and top-5 agreement (mean
fraction of the referee's top-5 classes in the artifact's top 5). A headless checkpoint's final output is the
pooled features: no top-k. The first stage outside a threshold is where the artifact first diverges.

THRESHOLDS were chosen by the sweep over known-good and known-bad quantizations (benchmarks/quant_sweep.py; the
table and why these numbers are in docs/parity.md, "Quantized artifacts").

Importing this module imports numpy only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError

# Chosen by the sweep (docs/parity.md "Quantized artifacts", benchmarks/results/quant_sweep.json). The stem is one
# convolution and a LayerNorm: every known-good quantization keeps it at 33-39 dB, a clipped input range drops it
# to 12 and LiteRT's full-integer build (LayerNorm in int8) to 20-21. Later stages accumulate the noise of every
# block: known-good ones end at 8-26 dB at stage4 (atto, tiny); GRN's arithmetic in int8 falls to 0-4 dB there.
# top-1 / top-5 on the seeded images of fixture weights are near-ties: loose floors (good ones went to 0.5 / 0.62).
THRESHOLDS: dict[str, float] = {
    "stem_sqnr_db": 25.0,
    "sqnr_db": 7.0,
    "cosine": 0.85,
    "top1_agreement": 0.5,
    "top5_agreement": 0.55,
}
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


# ------------------------------------------------------------------ the verdict

@dataclasses.dataclass
class StageJudgement:
    """One stage of a quantized artifact: its metrics and whether they meet the thresholds."""

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


def _judge_stage(name: str, value: np.ndarray, referee: np.ndarray, thresholds: Mapping[str, float]) -> StageJudgement:
    value = np.asarray(value)
    if value.shape != referee.shape:
        return StageJudgement(name, "fail", list(value.shape),
                              message=f"shape {tuple(value.shape)}, referee {tuple(referee.shape)}")
    if not np.all(np.isfinite(value)):
        return StageJudgement(name, "fail", list(value.shape), message="non-finite values")
    result = StageJudgement(name, "pass", list(value.shape), sqnr_db(value, referee), cosine(value, referee),
                            parity_rule.max_abs_error(value, referee), parity_rule.feature_scale(referee))
    problems = stage_problems(name, result.sqnr_db, result.cosine, thresholds)
    if problems:
        result.status, result.message = "fail", "; ".join(problems)
    else:
        result.message = f"SQNR {result.sqnr_db:.1f} dB, cosine {result.cosine:.4f}"
    return result


def stage_problems(name: str, sqnr: float, cos: float, thresholds: Mapping[str, float] | None = None) -> list[str]:
    """What one stage's SQNR and cosine break of ``thresholds`` (default THRESHOLDS); empty when it passes."""
    limits = {**THRESHOLDS, **(thresholds or {})}
    floor = limits["stem_sqnr_db"] if name == "stem" else limits["sqnr_db"]
    problems = []
    if sqnr < floor:
        problems.append(f"SQNR {sqnr:.1f} dB < {floor:g} dB")
    if cos < limits["cosine"]:
        problems.append(f"cosine {cos:.4f} < {limits['cosine']:g}")
    return problems


def judge_quantized(produced: Mapping[str, np.ndarray], referee: parity_rule.Referee,
                    thresholds: Mapping[str, float] | None = None) -> QuantizedVerdict:
    """Judge an int8 artifact's features (``produced``: stage name -> array in the referee's layout; the stages
    it does not expose are left out) by the quantization rule. The final output (logits, or pooled for a
    headless checkpoint) must be there."""
    limits = {**THRESHOLDS, **(thresholds or {})}
    names = referee.names
    if not names:
        raise BadInputError("the referee holds no features to judge a quantized artifact against")
    final = "logits" if "logits" in names else names[-1]
    if produced.get(final) is None:
        raise BadInputError(f"a quantized artifact is judged on its final output at least: {final!r} is missing "
                            f"(found {', '.join(sorted(produced)) or 'nothing'})")
    stages = [_judge_stage(name, produced[name], referee.features[name], limits)
              for name in names if produced.get(name) is not None]
    top1 = top5 = None
    final_stage = next(s for s in stages if s.name == final)
    if final == "logits" and final_stage.sqnr_db is not None:
        top1 = top_k_agreement(produced[final], referee.features[final], 1)
        top5 = top_k_agreement(produced[final], referee.features[final], 5)
        problems = [f"top-{k} agreement {got:.2f} < {limits[key]:g}"
                    for k, got, key in ((1, top1, "top1_agreement"), (5, top5, "top5_agreement")) if got < limits[key]]
        if problems:
            kept = [final_stage.message] if final_stage.status == "fail" else []
            final_stage.status, final_stage.message = "fail", "; ".join(kept + problems)
    failed = [s for s in stages if s.status == "fail"]
    metrics = {"sqnr_db": {s.name: s.sqnr_db for s in stages}, "cosine": {s.name: s.cosine for s in stages},
               "top1_agreement": top1, "top5_agreement": top5, "thresholds": dict(limits)}
    if failed:
        first = failed[0]
        reason = f"int8 rule: {first.name} {first.message}"
        return QuantizedVerdict("fail", first.name, reason, stages, metrics)
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
