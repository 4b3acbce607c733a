"""What a target format cannot carry of a checkpoint, declared as data so that no conversion changes a
checkpoint without saying so.

Each format that cannot carry everything declares it in its record (``Format.unrepresentable(ckpt, path,
write_options) -> list[Change]``, converters/format_contract.py), and only there; ``converters.save`` collects the list, warns with each change (and, for a change of the function, by how much the float64 logits
move on the parity rule's seeded inputs), puts them in its summary and, with ``strict=True``, refuses to write.
The helpers below are the shared vocabulary of those declarations, so every format words the same loss the same
way. ``as_written(ckpt, changes)`` is the checkpoint the target will hold: what the read-back check compares the
written file against, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint, Preprocessing
from convnextv2.reference.features import final_feature
from convnextv2.reference.variants import LAYER_NORM_EPS

# The fields a change can touch; as_written knows how to apply each.
FIELDS = ("head_norm_eps", "extras", "preprocessing", "weights")


@dataclasses.dataclass(frozen=True)
class Change:
    """One thing the target holds differently from the source."""

    field: str  # one of FIELDS
    message: str  # what changed, for a person: "final LayerNorm eps 1e-12 -> 1e-06"
    before: Any = None
    after: Any = None
    # Whether the model's function changes (then save measures by how much); preprocessing and extras do not.
    functional: bool = False
    # field "weights": the values the target stores, {canonical name: array} (a rounding the user asked for).
    values: Mapping[str, np.ndarray] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.field not in FIELDS:
            raise ValueError(f"a change's field must be one of {FIELDS}, not {self.field!r}")

    def to_json_dict(self) -> dict[str, Any]:
        return {"field": self.field, "message": self.message, "before": _plain(self.before),
                "after": _plain(self.after), "functional": self.functional}


def _plain(value: Any) -> Any:
    if isinstance(value, Preprocessing):
        return value.to_json_dict()
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------ the shared declarations

def fixed_head_norm_eps(ckpt: Checkpoint, target: str, eps: float = LAYER_NORM_EPS) -> list[Change]:
    """A target whose final LayerNorm always uses ``eps``."""
    if not ckpt.config.head_norm or ckpt.config.head_norm_eps == eps:
        return []
    return [Change("head_norm_eps", f"final LayerNorm eps {ckpt.config.head_norm_eps:g} -> {eps:g} ({target} "
                   "has no place for another eps)", ckpt.config.head_norm_eps, eps, functional=True)]


def dropped_extras(ckpt: Checkpoint, target: str, kept: Sequence[str] = ()) -> list[Change]:
    """A target that keeps only the extras named in ``kept`` (none by default)."""
    lost = sorted(name for name in ckpt.extras() if name not in set(kept))
    if not lost:
        return []
    shown = ", ".join(lost[:3]) + (", ..." if len(lost) > 3 else "")
    return [Change("extras", f"{len(lost)} extras tensor(s) not written ({target} has no place for them: {shown})",
                   lost, [], functional=False)]


def replaced_preprocessing(ckpt: Checkpoint, target: str, written: Preprocessing) -> list[Change]:
    """A target that cannot state the checkpoint's preprocessing; reading it back gives ``written``."""
    if ckpt.preprocessing == written:
        return []
    before, after = ckpt.preprocessing.to_json_dict(), written.to_json_dict()
    differ = [f"{key} {before[key]} -> {after[key]}" for key in before
              if key != "origin" and key in after and before[key] != after[key]]
    return [Change("preprocessing", f"preprocessing {', '.join(differ)} ({target} cannot state it; a reader "
                   "assumes the new values)", ckpt.preprocessing, written, functional=False)]


# ------------------------------------------------------------------ applying them

def as_written(ckpt: Checkpoint, changes: Sequence[Change]) -> Checkpoint:
    """The checkpoint the target holds once ``changes`` are applied (the read-back check's expectation)."""
    config, tensors, pre = ckpt.config, dict(ckpt.tensors), ckpt.preprocessing
    for change in changes:
        if change.field == "head_norm_eps":
            config = config.with_(head_norm_eps=float(change.after))
        elif change.field == "extras":
            for name in change.before:
                tensors.pop(name, None)
        elif change.field == "preprocessing":
            pre = change.after
        elif change.field == "weights" and change.values is not None:
            tensors.update(change.values)
    return dataclasses.replace(ckpt, config=config, tensors=tensors, preprocessing=pre)


def logits_difference(before: Checkpoint, after: Checkpoint, *, batch: int = 4, seed: int | None = None,
                      size: int | None = None) -> dict[str, Any]:
    """max |f_before - f_after| of the float64 PyTorch reference on the parity rule's seeded images (logits, or
    pooled features when headless), with max |f_before| for scale. When only the final LayerNorm's eps differs,
    the body runs once and the two heads are applied to its output."""
    from convnextv2.reference import parity_rule as rule

    size = int(size or before.preprocessing.input_size)
    images = rule.seeded_images(batch, size, rule.DEFAULT_SEED if seed is None else seed)
    name = final_feature(before.config)
    only_eps = (before.config.with_(head_norm_eps=after.config.head_norm_eps) == after.config
                and all(after.tensors[k] is v or np.array_equal(after.tensors[k], v)
                        for k, v in before.model_tensors().items()))
    if only_eps and before.config.head_norm:
        first = rule.referee_features(before, images)
        second = {name: _head(after, first["stage4"])}
    else:
        first = rule.referee_features(before, images)
        second = rule.referee_features(after, images)
    a, b = np.asarray(first[name], np.float64), np.asarray(second[name], np.float64)
    return {"feature": name, "max_abs": float(np.max(np.abs(a - b))), "max_abs_value": float(np.max(np.abs(a))),
            "images": [batch, 3, size, size], "dtype": "float64"}


def _head(ckpt: Checkpoint, stage4: np.ndarray) -> np.ndarray:
    """The reference's head (mean pool, LayerNorm at the checkpoint's eps, classifier) in float64 torch."""
    import torch

    x = torch.from_numpy(np.asarray(stage4, np.float64)).mean(dim=(2, 3))
    weight = torch.from_numpy(np.asarray(ckpt.tensors["head.norm.weight"], np.float64))
    bias = torch.from_numpy(np.asarray(ckpt.tensors["head.norm.bias"], np.float64))
    x = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps=ckpt.config.head_norm_eps)
    if ckpt.config.num_classes > 0:
        fc_w = torch.from_numpy(np.asarray(ckpt.tensors["head.fc.weight"], np.float64))
        fc_b = torch.from_numpy(np.asarray(ckpt.tensors["head.fc.bias"], np.float64))
        x = torch.nn.functional.linear(x, fc_w, fc_b)
    return x.numpy()


__all__ = ["FIELDS", "Change", "as_written", "dropped_extras", "fixed_head_norm_eps",
           "logits_difference", "replaced_preprocessing"]
