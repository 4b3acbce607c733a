"""The judgement of one artifact's run (converters/runners/artifact.py found its conventions): its final output and
every stage localisation could read, by the rule of the precision found; where it first diverges and, inside that
stage, the block and op (converters/runners/localise.py); for a reduced-precision failure the checkpoint's float16
headroom (reference/headroom.py); for an int8 artifact the quantization rule (reference/quantization_rule.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.runners.artifact_formats import Port
from convnextv2.reference import parity_rule
from convnextv2.reference.features import FEATURES, SPATIAL_FEATURES, final_feature

# The stage an output kind is judged at: probabilities against softmax of the referee's logits.
STAGE_OF_OUTPUT = {"logits": "logits", "probabilities": "logits", "pooled": "pooled"}


@dataclasses.dataclass
class ChosenRun:
    """The run the conventions chose: every output, which one is final and what it is, and the input it was fed."""

    path: Path
    format: str
    outputs: dict[str, np.ndarray]
    output_name: str
    kind: str  # logits | probabilities | pooled
    feed: np.ndarray
    port: Port
    localise: bool = True


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def baseline(referee: parity_rule.Referee, ckpt: Checkpoint, precision: str) -> dict[str, float]:
    """The referee's baseline errors at ``precision``; measured here when the referee was built without them."""
    base = parity_rule.baseline_precision(precision)
    if base not in referee.baselines:
        referee.baselines[base] = parity_rule.baseline_errors(
            parity_rule.baseline_features(ckpt, referee.images, base), referee.features)
    return referee.baselines[base]


def judge(result: parity_rule.Verdict, ckpt: Checkpoint, referee: parity_rule.Referee, chosen: ChosenRun,
          tolerance: parity_rule.Tolerance | None) -> None:
    """Fill ``result`` (status, reason, features, first divergence) and its artifact row."""
    row = result.artifact
    assert row is not None
    final = final_feature(ckpt.config)
    stage = STAGE_OF_OUTPUT[chosen.kind]
    produced: dict[str, np.ndarray] = {stage: chosen.outputs[chosen.output_name]}
    stages, tensors = _localise(row, chosen, ckpt, referee, produced)
    for name, (_, array) in stages.items():
        produced.setdefault(name, array)
    names = {name: stages[name][0] for name in stages}
    # The final output is always what is judged at its stage (probabilities against softmax of the referee's
    # logits), not a tensor localisation found before it.
    produced[stage] = chosen.outputs[chosen.output_name]
    names[stage] = chosen.output_name
    result.figures["produced"] = {k: v for k, v in produced.items() if k in FEATURES}
    if result.dtype == "int8":
        _judge_quantized(result, produced, ckpt, referee, chosen)
    else:
        _judge_float(result, produced, ckpt, referee, chosen, tolerance)
    judged = {f.name for f in result.features}
    if result.status != "error" and final not in judged and stage not in judged and result.dtype != "int8":
        result.status, result.reason = "error", f"the artifact's {final} could not be judged"
    if result.first_divergence:
        row["first_divergence"] = _where(result, names, tensors, ckpt, referee)
        if result.dtype in parity_rule.REDUCED_PRECISIONS:
            row["headroom"] = _headroom(ckpt, referee)


def _judge_float(result: parity_rule.Verdict, produced: Mapping[str, np.ndarray], ckpt: Checkpoint,
                 referee: parity_rule.Referee, chosen: ChosenRun, tolerance: parity_rule.Tolerance | None) -> None:
    tolerance = tolerance or parity_rule.Tolerance(result.dtype)
    result.tolerance = tolerance
    errors = baseline(referee, ckpt, result.dtype)
    for name in referee.names:
        if name not in produced:
            continue
        target, base = referee.features[name], errors[name]
        probabilities = name == "logits" and chosen.kind == "probabilities" and produced[name] is \
            chosen.outputs[chosen.output_name]
        if probabilities:
            target = softmax(referee.features["logits"])
            base = _probability_baseline(referee, ckpt, result.dtype)
        feature = parity_rule.compare_feature(name, produced[name], target, base, tolerance)
        if probabilities:
            feature.message = "; ".join(filter(None, [feature.message, "probabilities, against softmax of the "
                                                      "referee's logits"]))
        result.features.append(feature)
    failed = [f for f in result.features if f.status == "fail"]
    result.status = "fail" if failed else "pass"
    if failed:
        result.first_divergence = failed[0].name
        result.reason = f"{failed[0].name}: {failed[0].message}; the {result.dtype} rule ({tolerance.describe()})"
    else:
        result.reason = f"within the {result.dtype} rule ({tolerance.describe()}) on {len(result.features)} " \
                        f"feature(s): {', '.join(f.name for f in result.features)}"


def _probability_baseline(referee: parity_rule.Referee, ckpt: Checkpoint, precision: str) -> float:
    """The PyTorch baseline's error on probabilities (softmax of its logits), in float64."""
    base = parity_rule.baseline_features(ckpt, referee.images, parity_rule.baseline_precision(precision))
    return parity_rule.scale_aware_error(softmax(base["logits"]), softmax(referee.features["logits"]))


def _judge_quantized(result: parity_rule.Verdict, produced: dict[str, np.ndarray], ckpt: Checkpoint,
                     referee: parity_rule.Referee, chosen: ChosenRun) -> None:
    """The int8 rule: every stage within the margins of the int8 yardstick measured here on the referee's images."""
    from convnextv2.reference import quantization_rule

    if chosen.kind == "probabilities" and produced.get("logits") is chosen.outputs[chosen.output_name]:
        # Logits are softmax's input up to one constant per image: log-probabilities shifted to the referee's mean.
        logp = np.log(np.clip(np.asarray(produced["logits"], dtype=np.float64), 1e-300, None))
        produced["logits"] = logp - logp.mean(axis=1, keepdims=True) + \
            referee.features["logits"].mean(axis=1, keepdims=True)
    yardstick = quantization_rule.int8_yardstick(ckpt, referee.images)
    verdict = quantization_rule.judge_quantized({k: v for k, v in produced.items() if k in FEATURES}, referee,
                                                yardstick)
    row = result.artifact
    assert row is not None
    row["metrics"] = verdict.metrics
    result.status = verdict.status
    result.first_divergence = verdict.first_failing
    margins = ", ".join(f"{k} {v:g}" for k, v in verdict.metrics["thresholds"].items())
    result.reason = verdict.reason or (
        f"within the int8 rule (margins against the int8 yardstick: {margins}) on {len(verdict.stages)} "
        f"feature(s): {', '.join(s.name for s in verdict.stages)}")
    result.features = quantization_rule.feature_results(verdict, referee)


# ------------------------------------------------------------------ localisation

def _localise(row: dict[str, Any], chosen: ChosenRun, ckpt: Checkpoint, referee: parity_rule.Referee,
              produced: Mapping[str, np.ndarray]) -> tuple[dict[str, tuple[str, np.ndarray]], Any]:
    """Stage -> (tensor name, array in the referee's layout), and the intermediate tensors read (or None)."""
    named = {n: (n, v) for n, v in chosen.outputs.items() if n in FEATURES and n in referee.features
             and np.shape(v) == referee.features[n].shape}
    if not chosen.localise:
        row["localisation"] = {"how": "only the final output was judged: localisation not asked for"}
        return {}, None
    if any(n in SPATIAL_FEATURES for n in named):
        row["localisation"] = {"how": f"the artifact outputs its stages by name ({len(named)} of "
                                      f"{len(referee.names)})", "stages": {n: n for n in named}}
        return named, None
    from convnextv2.converters.runners import localise

    try:
        tensors = _intermediates(localise, chosen)
    except Exception as exc:  # the file ran as it is; the run with every tensor kept is another configuration
        tensors = f"the run keeping every intermediate tensor failed ({type(exc).__name__}: {exc})"
    if isinstance(tensors, str):
        row["localisation"] = {"how": f"only the final output was judged: {tensors}"}
        return {}, None
    located = localise.locate_stages(tensors, referee.features, len(referee.images))
    stages = {n: located.stages[n] for n in FEATURES if n in located.stages}
    row["localisation"] = {"how": located.how, "stages": {n: t for n, (t, _) in stages.items()}}
    return stages, (tensors, located)


def static_batches(port: Port, x: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    """``x`` in chunks of the input's static batch (all at once when it is dynamic), the last one padded with
    zeros to that batch: (chunk, how many of its images are real)."""
    step = (port.shape[0] if port.shape else None) or len(x)
    for start in range(0, len(x), step):
        part = x[start:start + step]
        given = len(part)
        if given < step:
            part = np.concatenate([part, np.zeros((step - given, *part.shape[1:]), dtype=part.dtype)])
        yield part, given


def _intermediates(localise: Any, chosen: ChosenRun) -> Any:
    """Every intermediate tensor of the chosen run, one chunk of the artifact's static batch at a time."""
    runs = []
    step = len(chosen.feed)
    for part, _ in static_batches(chosen.port, chosen.feed):
        step = len(part)
        got = localise.intermediate_tensors(chosen.format, chosen.path, {chosen.port.name: part})
        if isinstance(got, str):
            return got
        runs.append(got)
    if len(runs) == 1:
        return _trimmed(runs[0], len(chosen.feed), step)
    merged = []
    for group in zip(*runs, strict=True):
        first = group[0]
        arrays = [np.asarray(t.array) for t in group]
        if all(a.ndim and a.shape[0] == step for a in arrays):
            first = dataclasses.replace(first, array=np.concatenate(arrays)[:len(chosen.feed)])
        merged.append(first)
    return merged


def _trimmed(tensors: list[Any], count: int, step: int) -> list[Any]:
    if count == step:
        return tensors
    return [dataclasses.replace(t, array=np.asarray(t.array)[:count]) if np.ndim(t.array) and
            np.shape(t.array)[0] == step else t for t in tensors]


def _where(result: parity_rule.Verdict, names: Mapping[str, str], read: Any, ckpt: Checkpoint,
           referee: parity_rule.Referee) -> dict[str, Any]:
    """The first divergence as the report's object: feature, block, op, error, tolerance, tensor, non-finite op."""
    stage = result.first_divergence or ""
    feature = result.feature(stage)
    where: dict[str, Any] = {"feature": stage, "block": None, "op": None,
                             "scale_aware_error": feature.scale_aware_error if feature else None,
                             "tolerance": feature.tolerance_scale_aware if feature else None,
                             "tensor": names.get(stage), "non_finite_op": None}
    if read is None:
        return where
    from convnextv2.converters.runners import localise

    tensors, located = read
    try:
        if stage in SPATIAL_FEATURES:
            inside = dict(localise.divergence_inside(stage, tensors, ckpt, referee.images, localisation=located))
        else:
            inside = {"non_finite_op": localise.first_non_finite(tensors, located)}
    except Exception as exc:  # localisation inside a stage is a help, never the verdict
        inside = {"how": f"the op inside {stage} could not be found: {type(exc).__name__}: {exc}"}
    # The stage's own error and tolerance stay; the op's are kept beside them.
    for key in ("scale_aware_error", "tensor", "threshold"):
        if key in inside:
            inside[f"op_{key}"] = inside.pop(key)
    where.update({k: v for k, v in inside.items() if k != "feature"})
    if not isinstance(where.get("block"), int):  # "downsample": the op says it
        where["block"] = None
    return where


def _headroom(ckpt: Checkpoint, referee: parity_rule.Referee) -> dict[str, Any] | None:
    try:
        from convnextv2.reference import headroom
    except ImportError:
        return None
    return dict(headroom.float16_headroom(ckpt, referee.images))
