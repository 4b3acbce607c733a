"""A ConvNeXt V2 inside a bigger model's state dict: a detector's ``backbone.``, DDP's ``module.``, open_clip's
``visual.trunk.``, a distillation run's ``student.``.

Each naming (original, timm, mmpretrain) names one key its state dict always has (its anchor: the first block's
depthwise weight). Wherever the anchor appears, what precedes it is a candidate prefix; nothing is assumed about
which wrappers exist. The tensors under the chosen prefix are the checkpoint; every other tensor is counted by
the group it belongs to (``neck.``, ``rpn_head.``, ``visual.head.``) and reported, never dropped silently.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from convnextv2.reference.errors import BadInputError, UnplacedKeysError


@dataclasses.dataclass(frozen=True)
class Wrapped:
    """The tensors under ``prefix`` (prefix removed) and, by group, how many tensors were left outside it."""

    state: dict[str, np.ndarray]
    prefix: str
    left_behind: dict[str, int]
    # A name in ``state`` -> the file's own name for it (only where they differ).
    file_names: dict[str, str] = dataclasses.field(default_factory=dict)

    def layout(self) -> dict[str, Any]:
        """What a reader records in ``Source.layout`` (empty for a plain state dict)."""
        found: dict[str, Any] = {}
        if self.prefix:
            found["prefix"] = self.prefix
        if self.left_behind:
            found["left_behind"] = dict(self.left_behind)
        return found


def left_behind_text(groups: Mapping[str, int]) -> str:
    """``visual.head.* (1), neck.* (12)``: a group ending in a dot stands for every key under it."""
    return ", ".join(f"{group}{'*' if group.endswith('.') else ''} ({count})" for group, count in groups.items())


def candidate_prefixes(keys: Sequence[str], anchors: Sequence[str]) -> list[str]:
    """Every prefix under which one of ``anchors`` appears, shortest first."""
    found = {key[: len(key) - len(anchor)] for key in keys for anchor in anchors
             if key.endswith(anchor) and (len(key) == len(anchor) or key[len(key) - len(anchor) - 1] == ".")}
    return sorted(found, key=lambda p: (p.count("."), p))


def _group(key: str, prefix: str) -> str:
    """The group a left-behind key is counted in: the components it shares with ``prefix``, plus one."""
    parts = key.split(".")
    shared = 0
    for mine, theirs in zip(parts, prefix.split(".")[:-1], strict=False):
        if mine != theirs:
            break
        shared += 1
    count = min(shared + 1, len(parts))
    return ".".join(parts[:count]) + ("." if count < len(parts) else "")


def wrapper_parent(prefix: str) -> str:
    """The model that holds a wrapper: ``module.`` for ``module.backbone.``, "" for ``backbone.``. Parts of a
    model may sit beside the wrapper there, as a classifier's ``head.`` beside its ``backbone.``."""
    return prefix[: prefix.rstrip(".").rfind(".") + 1] if prefix.count(".") > 1 else ""


def unwrap(state: Mapping[str, np.ndarray], anchors: Sequence[str], where: str, naming: str, *,
           prefix: str | None = None, keep_outside: Sequence[str] = ()) -> Wrapped:
    """The state dict under the prefix one of ``anchors`` appears at (``prefix``: the user's choice where there
    are several). ``keep_outside``: prefixes (relative to the wrapper's parent) that belong to this naming
    though they sit beside the wrapper, as a classifier's ``head.`` beside its ``backbone.``; they stay in
    ``state`` with their own names."""
    keys = [str(k) for k in state]
    candidates = candidate_prefixes(keys, anchors)
    if prefix is not None:
        if prefix and not prefix.endswith("."):
            prefix += "."
        if prefix not in candidates:
            shown = ", ".join(repr(c) for c in candidates) or "none"
            raise BadInputError(f"{where}: --prefix {prefix!r} holds no {naming} ConvNeXt V2 "
                                f"(it would need {prefix}{anchors[0]}); prefixes that do: {shown}")
        chosen = prefix
    elif not candidates:
        raise UnplacedKeysError(where, naming, {k: tuple(np.shape(v)) for k, v in state.items()}, keys,
                                f"{where}: no {naming} ConvNeXt V2 in the file (no key ends with {anchors[0]})")
    elif len(candidates) > 1:
        raise BadInputError(f"{where}: {len(candidates)} ConvNeXt V2 models in the file, under "
                            f"{', '.join(repr(c) for c in candidates)}; choose one with --prefix")
    else:
        chosen = candidates[0]
    parent = wrapper_parent(chosen)
    inside: dict[str, np.ndarray] = {}
    file_names: dict[str, str] = {}
    outside: Counter[str] = Counter()
    for key, array in state.items():
        if key.startswith(chosen):
            name = key[len(chosen):]
        elif any(key.startswith(parent + extra) for extra in keep_outside):
            name = key[len(parent):]
        else:
            outside[_group(key, chosen)] += 1
            continue
        inside[name] = array
        if name != key:
            file_names[name] = key
    return Wrapped(inside, chosen, dict(sorted(outside.items())), file_names)


__all__ = ["Wrapped", "candidate_prefixes", "left_behind_text", "unwrap", "wrapper_parent"]
