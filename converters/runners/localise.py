"""Where a deployment artifact goes wrong: its intermediate tensors mapped onto ConvNeXt V2's stages, and inside the
first diverging stage the block and the op kind.

Stages (reference/features.py: stem, stage1..stage4, pooled, logits) are found in three ways, each said:

- shape: a tensor of the referee feature's shape, NCHW or NHWC (transposed back), or (N, C) with unit dims;
- position: stages in forward order; a stage output is a residual Add (an Add of two activations of the stage's
  shape, one computed from the other: not a decomposed LayerNorm's final Add), the last of its shape, and the stem
  output is the first residual Add's skip input;
- value: the candidate with the smallest scale-aware error against the float64 referee.

Value decides among candidates of the right shape, but a broken artifact's stage tensor matches nothing: then the
structural candidate is kept (so the first failing stage is named), unless another tensor matches far better
(NEAR_MATCH, 10x closer), which means the structure was misread. Inside the first diverging stage,
:func:`divergence_inside` compares each block's output, then each op of the first bad block (depthwise conv,
LayerNorm, pointwise Linear, GELU, GRN), with the float64 PyTorch reference run with forward hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from convnextv2.converters.runners.intermediates import Tensor, intermediate_tensors
from convnextv2.reference.features import FEATURES, SPATIAL_FEATURES
from convnextv2.reference.parity_rule import scale_aware_error
from convnextv2.reference.variants import MLP_RATIO

__all__ = ["FLOAT16_MAX", "NEAR_MATCH", "UNHEALED", "Localisation", "Tensor", "divergence_inside", "first_non_finite",
           "intermediate_tensors", "locate_stages"]

FLOAT16_MAX = 65504.0
# A value match this close (scale-aware) and 10x closer than the structural candidate overrides the structure.
NEAR_MATCH = 1e-2
# A stage off by this many times a later stage's error is not that stage's output (errors do not heal downstream).
UNHEALED = 100.0
_ADD_OPS = {"add", "addv2", "add_v2"}
_SOFTMAX_OPS = {"softmax", "logsoftmax", "log_softmax", "sigmoid"}
# Op types (lower case) by the kind of ConvNeXt V2 op they belong to, to say what a bad block contains.
OP_KINDS = {
    "GELU": {"erf", "tanh", "gelu"},
    "GRN": {"reducel2", "reducesumsquare", "normalizel2", "sqrt", "l2_normalization", "linalg_vector_norm"},
    "LayerNorm": {"layernormalization", "layer_norm", "mvn", "rsqrt", "pow", "reducemean", "mean", "squared_difference"},
    "pointwise Linear": {"linear", "matmul", "gemm", "fully_connected", "batch_matmul", "fullyconnected"},
    "convolution": {"conv", "conv2d", "conv_2d", "depthwise_conv_2d", "convolution", "groupconvolution"},
}


@dataclasses.dataclass
class Localisation:
    """Stage -> (artifact tensor name, its value in the referee's layout: NCHW, or (N, C)), and how each was found.

    ``positions``: the stage's index in the tensor list; ``errors``: its scale-aware error against the referee;
    ``layouts``: NCHW / NHWC / flat as read; ``blocks``: per spatial stage, the indices of its residual Adds
    (block outputs) in forward order; ``found``: per stage, how it was found (or why not)."""

    stages: dict[str, tuple[str, np.ndarray]]
    how: str
    found: dict[str, str] = dataclasses.field(default_factory=dict)
    positions: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: dict[str, float] = dataclasses.field(default_factory=dict)
    layouts: dict[str, str] = dataclasses.field(default_factory=dict)
    blocks: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def features(self) -> dict[str, np.ndarray]:
        """The located stages as a feature dict (what a runner's ``infer`` returns)."""
        return {name: array for name, (_, array) in self.stages.items()}

    def to_json_dict(self) -> dict[str, Any]:
        return {"how": self.how, "stages": {name: tensor for name, (tensor, _) in self.stages.items()},
                "found": dict(self.found)}


@dataclasses.dataclass
class _Pick:
    index: int
    layout: str
    array: np.ndarray
    error: float
    how: str


def _views(array: np.ndarray, shape: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    """``array`` seen in the referee's layout ``shape`` (NCHW or (N, C)): every reading that fits."""
    views = []
    if len(shape) == 4:
        n, c, h, w = shape
        if array.shape == shape:
            views.append(("NCHW", array))
        if array.shape == (n, h, w, c) and (h, w, c) != (c, h, w):
            views.append(("NHWC", array.transpose(0, 3, 1, 2)))
    elif len(shape) == 2 and array.ndim >= 2 and array.shape[0] == shape[0]:
        rest = tuple(d for d in array.shape[1:] if d != 1) or (1,)
        if rest == shape[1:]:
            views.append(("NC" if array.ndim == 2 else "flattened", array.reshape(shape)))
    return views


def _error(value: np.ndarray, referee: np.ndarray) -> float:
    if not np.all(np.isfinite(value)):
        return float("inf")
    return scale_aware_error(value, referee)


def _candidates(tensors: Sequence[Tensor], referee: np.ndarray, lo: int, hi: int) -> list[_Pick]:
    picks = []
    for index in range(max(lo, 0), min(hi, len(tensors))):
        views = _views(tensors[index].array, referee.shape)
        scored = [_Pick(index, layout, view, _error(view, referee), "") for layout, view in views]
        if scored:
            picks.append(min(scored, key=lambda p: p.error))
    return picks


def _choose(tensors: Sequence[Tensor], referee: np.ndarray, lo: int, hi: int, structural: int | None,
            structure: str) -> _Pick | None:
    """The tensor in [lo, hi) that is this feature: by value, the structural candidate kept when nothing else
    matches clearly better (a broken artifact's stage still has its place)."""
    picks = _candidates(tensors, referee, lo, hi)
    if not picks:
        return None
    best = min(picks, key=lambda p: p.error)
    struct = next((p for p in picks if p.index == structural), None)
    if struct is None:
        best.how = f"by shape and value (closest of {len(picks)} {_plural(len(picks), 'candidate')})"
        return best
    if struct.error <= best.error * (1 + 1e-6):
        struct.how = f"by shape, position ({structure}) and value"
        return struct
    if best.error <= NEAR_MATCH and best.error * 10 < struct.error:
        best.how = (f"by value (closest of {len(picks)}); {structure}, {tensors[struct.index].name}, is off by "
                    f"{struct.error:.3g}")
        return best
    struct.how = (f"by shape and position ({structure}); the closest value is {tensors[best.index].name} "
                  f"({best.error:.3g})")
    return struct


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def residual_adds(tensors: Sequence[Tensor]) -> list[int]:
    """Indices of the block outputs: Adds of two activations of the output's shape where one is computed from the
    other (the skip connection and its branch). A LayerNorm decomposed into ``x * scale + (beta - mean * scale)``
    (onnx2tf's, TensorFlow's) also adds two such activations, but neither is computed from the other."""
    return [index for index, _ in _residuals(tensors)]


def _residuals(tensors: Sequence[Tensor]) -> list[tuple[int, int]]:
    """(residual Add, its skip input) index pairs, in forward order."""
    index_of = {t.name: i for i, t in enumerate(tensors)}
    found = []
    for index, tensor in enumerate(tensors):
        inputs = [index_of.get(name) for name in dict.fromkeys(tensor.inputs)]
        if tensor.op.lower() not in _ADD_OPS or len(inputs) != 2 or None in inputs or not all(
                tensors[i].array.shape == tensor.array.shape for i in inputs):
            continue
        skip, branch = sorted(inputs)  # type: ignore[type-var]  # None was ruled out above
        if _reads(tensors, index_of, branch, skip):
            found.append((index, skip))
    return found


def _reads(tensors: Sequence[Tensor], index_of: Mapping[str, int], later: int, earlier: int) -> bool:
    """Whether tensor ``later`` is computed from tensor ``earlier``. The list is in topological order, so the search
    backwards stops below ``earlier``; a path through a tensor the reader left out (an integer or rank-5 one) cannot
    be followed, and then the Add counts as residual, as it would by shapes alone."""
    todo, seen = [later], {later}
    while todo:
        for name in tensors[todo.pop()].inputs:
            i = index_of.get(name)
            if i is None:
                return True
            if i == earlier:
                return True
            if i > earlier and i not in seen:
                seen.add(i)
                todo.append(i)
    return False


def locate_stages(tensors: Sequence[Tensor], referee: Mapping[str, np.ndarray], batch: int) -> Localisation:
    """Map the referee's features (stem, stage1..stage4, pooled, logits; those it has) onto ``tensors``, one run of
    an artifact on the first ``batch`` referee images."""
    ref = {name: np.asarray(referee[name], dtype=np.float64)[:batch] for name in FEATURES if name in referee}
    skips = dict(_residuals(tensors))
    residuals = list(skips)
    blocks = {name: [i for i in residuals if _views(tensors[i].array, ref[name].shape)]
              for name in SPATIAL_FEATURES[1:] if name in ref}
    result = Localisation({}, "", blocks=blocks)
    lo = 0
    for name, target in ref.items():
        hi, structural, structure = _bounds(name, tensors, ref, blocks, skips, lo)
        pick = _choose(tensors, target, lo, hi, structural, structure)
        if pick is None:
            result.found[name] = f"no tensor of shape {_shape_text(target.shape)} after the previous stage"
            continue
        result.stages[name] = (tensors[pick.index].name, pick.array)
        result.found[name] = pick.how
        result.positions[name] = pick.index
        result.errors[name] = pick.error
        result.layouts[name] = pick.layout
        lo = pick.index + 1
    hidden = _not_exposed(result)
    by_value = sum("position" not in how for name, how in result.found.items() if name in result.stages)
    result.how = (f"matched {len(result.stages)} of {len(ref)} stages by shape"
                  + (", position and value" if not by_value else " and value"))
    if hidden:
        result.how += (f"; not exposed (not judged): {', '.join(hidden)}, whose output the artifact fuses into "
                       "another op (" + "; ".join(result.found[name] for name in hidden) + ")")
    missing = [name for name in ref if name not in result.stages and name not in hidden]
    if missing:
        result.how += f"; not found: {', '.join(missing)}"
    return result


def _not_exposed(result: Localisation) -> list[str]:
    """Stages whose tensor is off while a later stage, computed from it, matches ``UNHEALED`` times closer: an
    error does not heal downstream, so that tensor is not the stage's output but a part of it (a LayerNorm whose
    bias add is folded into the next op leaves only ``x * scale``). Such a stage is dropped, not judged against the
    wrong tensor; a broken artifact's stages are off from the first broken one on, and keep their structural place."""
    hidden = []
    names = list(result.stages)
    for k, name in enumerate(names):
        error = result.errors[name]
        if not np.isfinite(error) or error <= NEAR_MATCH * 1e-3:
            continue
        later = [(result.errors[n], n) for n in names[k + 1:] if result.errors[n] <= NEAR_MATCH]
        if not later or min(later)[0] * UNHEALED >= error:
            continue
        best, where = min(later)
        result.found[name] = (f"{name}: the tensor at its place, {result.stages[name][0]}, is off by {error:.3g} "
                              f"while {where} matches at {best:.3g}")
        del result.stages[name], result.errors[name]
        hidden.append(name)
    return hidden


def _bounds(name: str, tensors: Sequence[Tensor], ref: Mapping[str, np.ndarray], blocks: Mapping[str, list[int]],
            skips: Mapping[int, int], lo: int) -> tuple[int, int | None, str]:
    """Where feature ``name`` can lie (an index bound above), its structural candidate and what that is."""
    end = len(tensors)
    if name == "stem":
        first = [i for i in blocks.get("stage1", []) if i >= lo]
        if not first:
            return end, None, ""
        return first[0], skips[first[0]], "the first residual Add's skip input"
    if name in blocks:
        following = SPATIAL_FEATURES[SPATIAL_FEATURES.index(name) + 1:]
        nxt = [i for later in following for i in blocks.get(later, [])]
        hi = min(nxt) if nxt else end
        own = [i for i in blocks[name] if lo <= i < hi]
        return hi, own[-1] if own else None, "the last residual Add of its shape"
    shape = ref[name].shape
    if name == "pooled":
        logits = [i for i in range(lo, end) if "logits" in ref and _views(tensors[i].array, ref["logits"].shape)]
        hi = logits[0] if logits and ref["logits"].shape != shape else end
        own = [i for i in range(lo, hi) if _views(tensors[i].array, shape)]
        return hi, own[-1] if own else None, "the last tensor of its shape before the classifier"
    own = [i for i in range(lo, end) if _views(tensors[i].array, shape) and tensors[i].op.lower() not in _SOFTMAX_OPS]
    return end, own[-1] if own else None, "the last tensor of its shape that is not a softmax"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


# ------------------------------------------------------------------ inside the first diverging stage

def first_non_finite(tensors: Sequence[Tensor], localisation: Localisation | None = None,
                     float16: bool | None = None) -> dict[str, Any] | None:
    """The first tensor whose value is non-finite, or (a float16 tensor, or every tensor with ``float16``) reaches
    the float16 maximum 65504: its name, op type, index, stage and block where the localisation places it."""
    for index, tensor in enumerate(tensors):
        array = tensor.array
        finite = np.isfinite(array)
        what = None
        if not np.all(finite):
            count = int(array.size - np.count_nonzero(finite))
            what = f"non-finite ({count} of {array.size} values inf or nan)"
        elif (float16 or (float16 is None and array.dtype == np.float16)) and array.size and \
                float(np.max(np.abs(array))) >= FLOAT16_MAX:
            what = f"saturates: |x| reaches {float(np.max(np.abs(array))):.6g} >= {FLOAT16_MAX:g} (float16 max)"
        if what:
            stage, block = _place(index, tensors, localisation)
            shape = localisation.stages[stage][1].shape if localisation and stage in localisation.stages else None
            return {"tensor": tensor.name, "op": tensor.op, "kind": _kind_of(tensor, shape), "index": index,
                    "stage": stage, "block": block, "what": what}
    return None


def _kind_of(tensor: Tensor, stage_shape: tuple[int, ...] | None) -> str | None:
    """The ConvNeXt V2 op a tensor belongs to, from its op type and its shape against its stage's (N, C, H, W): a
    per-image, per-channel reduction over the 4C hidden channels is GRN's sum or norm (whatever op computes it,
    a MatMul with ones included); a per-position one over the channels is a LayerNorm statistic."""
    op = tensor.op.lower()
    if op in OP_KINDS["GELU"]:
        return "GELU"
    if op in ("layernormalization", "layer_norm", "mvn"):
        return "LayerNorm"
    if stage_shape is not None and len(stage_shape) == 4:
        n, c, h, w = stage_shape
        size, dims = tensor.array.size, tensor.array.shape
        if size == n * MLP_RATIO * c and MLP_RATIO * c in dims and h * w > 1:
            return "GRN"
        if size == n * h * w and (dims[-1] == 1 or (len(dims) == 4 and dims[1] == 1)) and c > 1:
            return "LayerNorm"
        squares = op in ("pow", "power", "square", "squared_difference") or (
            op in ("mul", "multiply") and len(tensor.inputs) >= 2 and len(set(tensor.inputs)) == 1)
        if squares:  # x * x: GRN's squares over the hidden channels, else a LayerNorm's
            return "GRN" if MLP_RATIO * c in dims else "LayerNorm"
    return next((kind for kind, names in OP_KINDS.items() if op in names), None)


def _place(index: int, tensors: Sequence[Tensor], localisation: Localisation | None) -> tuple[str | None, Any]:
    """The stage and block (an int, "downsample", or None) that tensor ``index`` belongs to."""
    if localisation is None:
        return None, None
    order = [name for name in FEATURES if name in localisation.positions]
    stage = next((name for name in order if localisation.positions[name] >= index), None)
    if stage is None:
        return None, None
    blocks = localisation.blocks.get(stage, [])
    block = next((j for j, position in enumerate(blocks) if position >= index), None)
    if block == 0 and stage != "stage1" and stage in localisation.stages:
        before = order[order.index(stage) - 1] if order.index(stage) else None
        start = localisation.positions[before] if before else -1
        shape = localisation.stages[stage][1].shape
        entry = next((i for i in range(start + 1, len(tensors)) if _views(tensors[i].array, shape)), None)
        if entry is not None and index <= entry:
            return stage, "downsample"
    return stage, block


def divergence_inside(stage: str, tensors: Sequence[Tensor], referee_ckpt: Any, images: np.ndarray, *,
                      localisation: Localisation | None = None, tolerance: float | None = None) -> dict[str, Any]:
    """Inside ``stage`` (the first diverging one): the block and the op kind where the artifact first goes wrong,
    against the float64 PyTorch reference on ``images`` (the images the tensors were computed on, NCHW normalised),
    and the first op whose output is non-finite or saturates float16.

    ``tolerance``: the scale-aware error past which an op is wrong (default 10x the error of the stage's input,
    at least 1e-6). Returns ``feature``, ``block`` (int, "downsample" or None), ``op`` (the kind: LayerNorm, GELU,
    GRN, pointwise Linear, depthwise conv, downsample LayerNorm/conv, ...), ``tensor``, ``artifact_op``,
    ``scale_aware_error``, ``threshold``, ``ops`` (the op types from the last good tensor to the bad one),
    ``block_errors``, ``how`` and ``non_finite_op``."""
    from convnextv2.reference.features import FEATURES as NAMES

    if stage not in NAMES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(NAMES)}")
    batch = _batch_of(tensors, localisation, len(images))
    images = np.asarray(images)[:batch]
    features, steps = _reference_steps(referee_ckpt, images, stage)
    if localisation is None:
        localisation = locate_stages(tensors, features, batch)
    result: dict[str, Any] = {"feature": stage, "block": None, "op": None, "tensor": None, "artifact_op": None,
                              "scale_aware_error": None, "threshold": None, "ops": [], "block_errors": [],
                              "how": "", "non_finite_op": first_non_finite(tensors, localisation)}
    order = [name for name in NAMES if name in features]
    before = order[order.index(stage) - 1] if order.index(stage) else None
    start = localisation.positions.get(before, -1) if before else -1
    e_in = localisation.errors.get(before, 0.0) if before else 0.0
    threshold = tolerance if tolerance is not None else max(10 * e_in, 1e-6)
    result["threshold"] = threshold
    end = localisation.positions.get(stage, len(tensors) - 1) + 1
    blocks = [i for i in localisation.blocks.get(stage, []) if start < i < end]
    outs = [(j, array) for kind, j, array in steps if kind == "residual Add"]
    lo = start + 1
    block_pos: list[int] = []
    for j, array in outs:
        structural = blocks[j] if len(blocks) == len(outs) else None
        pick = _choose(tensors, array, lo, end, structural, "its residual Add")
        if pick is None:
            break
        result["block_errors"].append(pick.error)
        block_pos.append(pick.index)
        lo = pick.index + 1
    bad = next((j for j, e in enumerate(result["block_errors"]) if e > threshold), None)
    if outs and bad is None and len(block_pos) == len(outs):
        result["how"] = (f"every block output of {stage} is within {threshold:.3g} of the reference: it goes wrong "
                         "after the last block")
        return result
    if outs:
        # The ops before the first bad block's output: the downsample (its first block), then that block.
        first = bad if bad is not None else len(block_pos)
        lo = start + 1 if first == 0 else block_pos[first - 1] + 1
        hi = block_pos[first] + 1 if first < len(block_pos) else end
        wanted = [(kind, j, a) for kind, j, a in steps if j == first or (first == 0 and j is None)]
        result["block"] = first
    else:
        lo, hi, wanted = start + 1, end, steps
    _walk(result, tensors, wanted, lo, hi, threshold)
    if result["op"] and result["op"].startswith("downsample"):
        result["block"] = "downsample"
    return result


def _walk(result: dict[str, Any], tensors: Sequence[Tensor], steps: Sequence[tuple[str, Any, np.ndarray]],
          lo: int, hi: int, threshold: float) -> None:
    """The first reference op in ``steps`` (forward order) whose best artifact tensor in [lo, hi) is off."""
    good = lo - 1
    for kind, _, array in steps:
        pick = _choose(tensors, array, good + 1, hi, None, "")
        if pick is None or pick.error > threshold:
            stop = pick.index + 1 if pick is not None else hi
            seen = [t.op for t in tensors[good + 1:stop]]
            result.update(op=kind, ops=seen, kinds=_kinds(seen))
            if pick is None:
                result["how"] = (f"no tensor of the reference {kind}'s shape {_shape_text(array.shape)} follows the "
                                 "last matching one: the op is missing or fused")
                return
            result.update(tensor=tensors[pick.index].name, artifact_op=tensors[pick.index].op,
                          scale_aware_error=pick.error)
            block = "" if result["block"] is None else f" of block {result['block']}"
            result["how"] = (f"the {kind}{block} is the first op whose closest artifact tensor is off by "
                             f"{pick.error:.3g} (> {threshold:.3g}); every op before it matches")
            return
        good = pick.index
    result["how"] = "every op visible in the artifact matches the reference within the threshold"


def _kinds(ops: Sequence[str]) -> list[str]:
    kinds = []
    for op in ops:
        for kind, names in OP_KINDS.items():
            if op.lower() in names and kind not in kinds:
                kinds.append(kind)
    return kinds


def _batch_of(tensors: Sequence[Tensor], localisation: Localisation | None, default: int) -> int:
    if localisation is not None and localisation.stages:
        return int(next(iter(localisation.stages.values()))[1].shape[0])
    first = next((t.array for t in tensors if t.array.ndim == 4), None)
    return int(first.shape[0]) if first is not None else default


def _reference_steps(ckpt: Any, images: np.ndarray,
                     stage: str) -> tuple[dict[str, np.ndarray], list[tuple[str, int | None, np.ndarray]]]:
    """The float64 PyTorch reference's features and, for ``stage``, each op's output in forward order as
    (kind, block index or None, NCHW or (N, C) array)."""
    import torch

    from convnextv2 import reference

    model = reference.build(ckpt, "torch", dtype="float64")
    steps: list[tuple[str, int | None, np.ndarray]] = []
    handles = []

    def record(kind: str, block: int | None, channels_last: bool = False, use_input: bool = False) -> Any:
        def hook(module: Any, inputs: Any, output: Any) -> None:
            value = (inputs[0] if use_input else output).detach()
            if channels_last:
                value = value.permute(0, 3, 1, 2)
            steps.append((kind, block, value.numpy().copy()))
        return hook

    def watch(module: Any, *args: Any, **kwargs: Any) -> None:
        handles.append(module.register_forward_hook(record(*args, **kwargs)))

    if stage == "stem":
        watch(model.stem.conv, "stem conv", None)
        watch(model.stem.norm, "stem LayerNorm", None)
    elif stage in SPATIAL_FEATURES:
        module = model.stages[SPATIAL_FEATURES.index(stage) - 1]
        if module.downsample is not None:
            watch(module.downsample.norm, "downsample LayerNorm", None)
            watch(module.downsample.conv, "downsample conv", None)
        for j, block in enumerate(module.blocks):
            watch(block.dwconv, "depthwise conv", j)
            watch(block.norm, "LayerNorm", j, channels_last=True)
            watch(block.pwconv1, "pointwise Linear", j, channels_last=True)
            watch(block.grn, "GELU", j, channels_last=True, use_input=True)
            watch(block.grn, "GRN", j, channels_last=True)
            watch(block.pwconv2, "pointwise Linear", j, channels_last=True)
            watch(block, "residual Add", j)
    elif stage == "pooled" and model.head.norm is not None:
        watch(model.head.norm, "global average pool", None, use_input=True)
        watch(model.head.norm, "head LayerNorm", None)
    elif stage == "logits" and model.head.fc is not None:
        watch(model.head.fc, "classifier", None)
    try:
        features = reference.run_features(model, "torch", images)
    finally:
        for handle in handles:
            handle.remove()
    del model, torch
    if stage == "pooled" and not steps:
        steps.append(("global average pool", None, features["stage4"].mean(axis=(2, 3))))
    return features, steps
