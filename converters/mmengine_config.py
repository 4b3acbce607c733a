"""The preprocessing an mmengine training run states in its checkpoint, read without running anything.

mmengine's Runner stores the run's config in every checkpoint it saves, as Python source: ``meta["cfg"]``, the
config's ``pretty_text`` (``data_preprocessor = dict(mean=[123.675, ...], std=[...], to_rgb=True)``,
``test_dataloader = dict(dataset=dict(pipeline=[dict(type='ResizeEdge', scale=256, edge='short'), ...]))``).
Executing it would run whatever the file's author put there, so it is parsed (``ast``) and only module-level
assignments of literals, lists, tuples, dicts and ``dict(...)`` calls with literal arguments are taken; any other
expression is left out, as if unstated.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

# A config's text is a few tens of kB; a larger one is not read (parsing is linear, but its tree is not small).
MAX_CONFIG_CHARS = 1_000_000
# mmcv's normalisers work on 0-255 pixels; the toolkit's mean and std on 0-1.
PIXEL_SCALE = 255.0
# mmcv's interpolation names -> the toolkit's (Preprocessing.interpolation).
_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "lanczos": "lanczos",
                   "box": "box", "hamming": "hamming", "area": "box"}


class _NotLiteral(Exception):
    pass


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise _NotLiteral
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        if any(keyword.arg is None for keyword in node.keywords):
            raise _NotLiteral
        return {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    raise _NotLiteral


def literal_config(text: Any) -> dict[str, Any]:
    """The module-level ``name = <literal>`` assignments of a config's source text; {} when it is not text or
    does not parse."""
    if not isinstance(text, str) or len(text) > MAX_CONFIG_CHARS:
        return {}
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return {}
    found: dict[str, Any] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                and isinstance(statement.targets[0], ast.Name):
            try:
                found[statement.targets[0].id] = _literal(statement.value)
            except (_NotLiteral, RecursionError):
                continue
    return found


def _normalisation(config: Mapping[str, Any]) -> dict[str, Any]:
    model = config.get("model")
    stated = config.get("data_preprocessor")
    if not isinstance(stated, Mapping) and isinstance(model, Mapping):
        stated = model.get("data_preprocessor")
    if not isinstance(stated, Mapping):
        return {}
    try:
        mean = [float(v) / PIXEL_SCALE for v in stated["mean"]]
        std = [float(v) / PIXEL_SCALE for v in stated["std"]]
    except (KeyError, TypeError, ValueError):
        return {}
    if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
        return {}
    # mmcv loads images as BGR; to_rgb flips them before the mean is subtracted. Without it the model sees BGR.
    return {"mean": tuple(mean), "std": tuple(std), "rgb": bool(stated.get("to_rgb", False))}


def _test_pipeline(config: Mapping[str, Any]) -> list[Any] | None:
    # What the run evaluated with: the test dataloader's own pipeline, else the test_pipeline variable.
    for loader in ("test_dataloader", "val_dataloader"):
        dataset = config.get(loader, {}).get("dataset") if isinstance(config.get(loader), Mapping) else None
        if isinstance(dataset, Mapping) and isinstance(dataset.get("pipeline"), list):
            return dataset["pipeline"]
    pipeline = config.get("test_pipeline")
    return pipeline if isinstance(pipeline, list) else None


def _size(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return int(value[0])
    return None


def _geometry(pipeline: list[Any]) -> dict[str, Any]:
    """Input size, crop fraction, interpolation and crop mode from a ResizeEdge + CenterCrop or a square Resize."""
    steps = [step for step in pipeline if isinstance(step, Mapping)]
    resize = next((s for s in steps if s.get("type") in ("ResizeEdge", "Resize")), None)
    crop = next((s for s in steps if s.get("type") == "CenterCrop"), None)
    if resize is None:
        return {}
    found: dict[str, Any] = {}
    interpolation = _INTERPOLATIONS.get(str(resize.get("interpolation", "bilinear")))
    if interpolation is not None:
        found["interpolation"] = interpolation
    crop_size = _size(crop.get("crop_size")) if crop is not None else None
    if resize.get("type") == "ResizeEdge" and resize.get("edge", "short") == "short":
        edge = _size(resize.get("scale"))
        if edge and crop_size:
            found.update(input_size=crop_size, crop_pct=crop_size / edge, crop_mode="center")
    elif resize.get("type") == "Resize" and crop is None:
        side = _size(resize.get("scale"))
        if side:
            found.update(input_size=side, crop_pct=1.0, crop_mode="squash")
    return found


def stated_preprocessing(text: Any) -> dict[str, Any]:
    """The preprocessing fields a run's config text states (``Preprocessing`` field names, plus ``rgb``: whether
    the model takes RGB); {} where it states none."""
    config = literal_config(text)
    found = _normalisation(config)
    pipeline = _test_pipeline(config)
    if pipeline is not None:
        found.update(_geometry(pipeline))
    return found


__all__ = ["PIXEL_SCALE", "literal_config", "stated_preprocessing"]
