"""facebookresearch/ConvNeXt-V2 checkpoints, in and out.

Three layouts share the ``.pt`` zip format:
- ``finetuned``: ``{"model": state_dict}`` (or ``model_ema``, or a bare state dict), GRN (1,1,1,4C);
- ``fcmae``: the released ``pt_only`` encoders, same dense names, no ``norm``/``head``, GRN (1,4C);
- ``fcmae-sparse``: raw pretraining checkpoints, MinkowskiEngine layout under ``encoder.``, plus a decoder
  (``proj``, ``mask_token``, ``decoder.0``, ``pred``) that is kept verbatim under ``extras.fcmae.``.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint, Preprocessing, Source
from convnextv2.converters.digests import lazy_sha256
from convnextv2.converters.format_contract import Format, Naming, always, tensor_bytes
from convnextv2.converters.format_limits import Change, dropped_extras, fixed_head_norm_eps, replaced_preprocessing
from convnextv2.converters.progress import byte_progress
from convnextv2.converters.state_files import plain_data, select_weights
from convnextv2.converters.torchzip import (
    PickledNamespace,
    is_legacy_torch,
    is_torch_zip,
    read_torch_zip,
    write_torch_zip,
)
from convnextv2.converters.wrapped import Wrapped, unwrap
from convnextv2.reference import layouts, schema
from convnextv2.reference.errors import BadInputError, UnplacedKeysError
from convnextv2.reference.keymap import KeyTable, Rule
from convnextv2.reference.variants import check_variant

NAME = "original"
LAYOUTS = ("finetuned", "fcmae", "fcmae-sparse")
EXTRAS_NAMESPACE = "extras.fcmae."

# GRN's stored shape per layout when the source does not tell us (a canonical file from elsewhere).
DEFAULT_GRN_SHAPE = {"finetuned": [1, 1, 1, -1], "fcmae": [1, -1], "fcmae-sparse": [1, -1]}


# ------------------------------------------------------------ key tables

@functools.lru_cache(maxsize=16)
def _key_table(layout: str, grn_shape: tuple[int, ...]) -> KeyTable:
    grn = layouts.grn(grn_shape)
    if layout != "fcmae-sparse":
        return KeyTable([
            Rule("downsample_layers.0.0.{p}", "stem.conv.{p}"),
            Rule("downsample_layers.0.1.{p}", "stem.norm.{p}"),
            Rule("downsample_layers.{i}.0.{p}", "stages.{i}.downsample.norm.{p}"),
            Rule("downsample_layers.{i}.1.{p}", "stages.{i}.downsample.conv.{p}"),
            Rule("stages.{s}.{b}.grn.{p}", "stages.{s}.blocks.{b}.grn.{p}", grn),
            Rule("stages.{s}.{b}.{p}.weight", "stages.{s}.blocks.{b}.{p}.weight"),
            Rule("stages.{s}.{b}.{p}.bias", "stages.{s}.blocks.{b}.{p}.bias"),
            Rule("norm.{p}", "head.norm.{p}"),
            Rule("head.{p}", "head.fc.{p}"),
        ])
    return KeyTable([
        Rule("encoder.downsample_layers.0.0.{p}", "stem.conv.{p}"),
        Rule("encoder.downsample_layers.0.1.{p}", "stem.norm.{p}"),
        Rule("encoder.downsample_layers.{i}.0.ln.{p}", "stages.{i}.downsample.norm.{p}"),
        Rule("encoder.downsample_layers.{i}.1.kernel", "stages.{i}.downsample.conv.weight", layouts.SPARSE_CONV),
        Rule("encoder.downsample_layers.{i}.1.bias", "stages.{i}.downsample.conv.bias", layouts.SPARSE_BIAS),
        Rule("encoder.stages.{s}.{b}.dwconv.kernel", "stages.{s}.blocks.{b}.dwconv.weight", layouts.SPARSE_DEPTHWISE),
        Rule("encoder.stages.{s}.{b}.dwconv.bias", "stages.{s}.blocks.{b}.dwconv.bias", layouts.SPARSE_BIAS),
        Rule("encoder.stages.{s}.{b}.norm.ln.{p}", "stages.{s}.blocks.{b}.norm.{p}"),
        Rule("encoder.stages.{s}.{b}.pwconv1.linear.{p}", "stages.{s}.blocks.{b}.pwconv1.{p}"),
        Rule("encoder.stages.{s}.{b}.pwconv2.linear.{p}", "stages.{s}.blocks.{b}.pwconv2.{p}"),
        Rule("encoder.stages.{s}.{b}.grn.{p}", "stages.{s}.blocks.{b}.grn.{p}", grn),
    ])


def key_table(layout: str, grn_shape: Sequence[int] | None = None) -> KeyTable:
    """The key table of one original layout, GRN written in ``grn_shape`` (default: the layout's usual one).
    Reading does not depend on ``grn_shape``: GRN is read from any shape of leading 1s."""
    return _key_table(layout, tuple(int(s) for s in grn_shape or DEFAULT_GRN_SHAPE[layout]))


DENSE = key_table("finetuned")
SPARSE = key_table("fcmae-sparse")


# ------------------------------------------------------------ reading

def sniff(path: Path) -> bool:
    return path.is_file() and (is_torch_zip(path) or is_legacy_torch(path))


# Plain training data kept beside the weights and written back into the layout it came from.
KEPT_ENTRIES = ("epoch", "args")
# The key every dense original state dict has (first block's depthwise weight): where it sits tells the prefix.
ANCHORS = ("stages.0.0.dwconv.weight",)
# The raw pretraining checkpoints' MinkowskiEngine encoder: sparse kernels under "encoder.".
_SPARSE_MARKER = re.compile(r"^encoder\.stages\.\d+\.\d+\.dwconv\.kernel$")


def select_state_dict(obj: Any, ema: bool, where: str, prefix: str | None = None) -> tuple[Wrapped, dict[str, Any]]:
    """The original state dict in a loaded checkpoint, found under any wrapper prefix, and the plain-data
    leftovers for ``info``."""
    weights = select_weights(obj, where, ema=ema, keep=KEPT_ENTRIES)
    info: dict[str, Any] = {"container": weights.container}
    info.update({name: plain_data(value) for name, value in weights.kept.items()})
    if weights.skipped:
        info["skipped"] = weights.skipped
    if prefix is None and any(_SPARSE_MARKER.match(k) for k in weights.state):
        return Wrapped(weights.state, "", {}), info  # the sparse layout's own "encoder.", not a wrapper
    return unwrap(weights.state, ANCHORS, where, NAME, prefix=prefix), info


def detect_layout(state: Mapping[str, np.ndarray]) -> str:
    if any(_SPARSE_MARKER.match(k) for k in state):
        return "fcmae-sparse"
    return "finetuned" if "head.weight" in state else "fcmae"


def state_dict_to_canonical(state: Mapping[str, np.ndarray], where: str) -> tuple[dict[str, np.ndarray], str, list[int] | None]:
    """Rename/reshape an original state dict; returns (canonical tensors, layout, stored GRN shape)."""
    layout = detect_layout(state)
    table = key_table(layout)
    tensors: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    grn_shape: list[int] | None = None
    for key, array in state.items():
        mapped = table.to_canonical(key)
        if mapped is None:
            if layout == "fcmae-sparse" and not key.startswith("encoder."):
                tensors[EXTRAS_NAMESPACE + key] = array
            else:
                unknown.append(key)
            continue
        name, rule = mapped
        if rule.transform.name == layouts.GRN and grn_shape is None:
            grn_shape = [1] * (array.ndim - 1) + [-1]
        tensors[name] = rule.transform.to_canonical(array, f"{where}: {key}")
    if unknown:
        raise UnplacedKeysError.in_state(where, NAME, state, unknown, f"the {layout} layout")
    return tensors, layout, grn_shape


def read(path: Path, *, variant: str | None = None, ema: bool = False, prefix: str | None = None) -> Checkpoint:
    """``prefix``: where the model sits in a wrapper's state dict (``backbone.``), when several places hold one."""
    return read_named(path, path.name, variant=variant, ema=ema, prefix=prefix)


def read_named(path: Path, file_name: str, *, variant: str | None = None, ema: bool = False,
               prefix: str | None = None) -> Checkpoint:
    """``read`` of a file as though it were called ``file_name``: the preprocessing a .pt file implies comes
    from its name, and a conversion reads its output back before the output has one."""
    where = str(path)
    obj = read_torch_zip(path)
    wrapped, info = select_state_dict(obj, ema, where, prefix)
    try:
        tensors, layout, grn_shape = state_dict_to_canonical(wrapped.state, where)
    except UnplacedKeysError as exc:
        raise exc.in_file_names(wrapped.file_names) from None
    config = schema.infer_config({k: v.shape for k, v in tensors.items()}, where)
    ckpt = Checkpoint(
        config=config,
        tensors=tensors,
        preprocessing=Preprocessing.assumed_from_file_name(file_name),
        source=Source(
            format=NAME,
            file_name=file_name,
            digest=lazy_sha256(path),  # a full read: done when needed
            layout={"layout": layout, "grn_shape": grn_shape or DEFAULT_GRN_SHAPE[layout], "ema": ema,
                    **wrapped.layout()},
        ),
        info=info,
    )
    ckpt.validate(where)
    check_variant(config, variant, where)
    return ckpt


# ------------------------------------------------------------ writing

def _original_order(name: str) -> tuple[int, ...]:
    """Registration order of the original model: downsample layers, then stages, then norm, head."""
    if name.startswith("encoder."):
        return _original_order(name[len("encoder."):])
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        return (0, int(parts[1]), int(parts[2]))
    if parts[0] == "stages":
        return (1, int(parts[1]), int(parts[2]))
    return (2,) if parts[0] == "norm" else (3,)


def canonical_to_state_dict(ckpt: Checkpoint, layout: str) -> collections.OrderedDict[str, np.ndarray]:
    if layout not in LAYOUTS:
        raise BadInputError(f"unknown original layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "finetuned" and ckpt.config.num_classes == 0:
        raise BadInputError("a headless checkpoint cannot be written as a fine-tuned file; use --layout fcmae")
    if layout.startswith("fcmae") and ckpt.config.num_classes > 0:
        raise BadInputError(f"the {layout} layout is an encoder only; this checkpoint has a {ckpt.config.num_classes}-class head")
    source_layout = ckpt.source.layout if ckpt.source.format == NAME else {}
    grn_shape = source_layout.get("grn_shape") if source_layout.get("layout") == layout else None
    table = key_table(layout, grn_shape)
    entries = [(key, array) for key, _, array in table.to_foreign_tensors(ckpt.model_tensors(), f"the {layout} layout")]
    entries.sort(key=lambda item: _original_order(item[0]))
    if layout == "fcmae-sparse":
        entries += [(k[len(EXTRAS_NAMESPACE):], v) for k, v in sorted(ckpt.extras().items())
                    if k.startswith(EXTRAS_NAMESPACE)]
    return collections.OrderedDict(entries)


def default_layout(ckpt: Checkpoint) -> str:
    if ckpt.source.format == NAME and ckpt.source.layout.get("layout") in LAYOUTS:
        return str(ckpt.source.layout["layout"])
    return "finetuned" if ckpt.config.num_classes > 0 else "fcmae"


def unrepresentable(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    """What an original .pt cannot hold: another final-norm eps, extras (but the sparse layout's own), and any
    preprocessing other than the one a reader infers from the file name."""
    layout = options.get("layout") or default_layout(ckpt)
    target = f"the original {layout} layout"
    found = []
    if layout != "fcmae-sparse":  # the sparse layout has no final norm at all; its writer refuses one
        found += fixed_head_norm_eps(ckpt, target)
    kept = [n for n in ckpt.extras() if n.startswith(EXTRAS_NAMESPACE)] if layout == "fcmae-sparse" else []
    found += dropped_extras(ckpt, target, kept)
    found += replaced_preprocessing(ckpt, "an original .pt file", Preprocessing.assumed_from_file_name(Path(path).name))
    return found


def write(ckpt: Checkpoint, path: Path, *, layout: str | None = None) -> None:
    """The torch zip at ``path`` (written in place; converters.save makes it atomic)."""
    write_as(ckpt, path, path, layout=layout)


def write_as(ckpt: Checkpoint, path: Path, dest: Path, *, layout: str | None = None) -> None:
    """As torch.save does, the zip's archive name is the file's stem: ``dest``'s, while ``path`` is unnamed."""
    ckpt.validate(f"writing {dest}")
    layout = layout or default_layout(ckpt)
    state = canonical_to_state_dict(ckpt, layout)
    container: dict[str, Any] = {"model": state}
    # Training epoch and args go back only into the layout they came from, so nothing is invented.
    if ckpt.source.format == NAME and ckpt.source.layout.get("layout") == layout:
        if ckpt.info.get("container") == "bare":
            container = state  # type: ignore[assignment]
        else:
            if "epoch" in ckpt.info:
                container["epoch"] = ckpt.info["epoch"]
            if isinstance(ckpt.info.get("args"), dict):
                container["args"] = PickledNamespace(ckpt.info["args"])
    total = sum(int(a.size) * a.dtype.itemsize for a in state.values())
    with byte_progress(total, f"writing {dest.name}") as bar:
        write_torch_zip(path, container, archive_name=dest.stem or "archive", progress=bar)


# One torch zip read by content (read_named supplies the name its preprocessing comes from): conversions
# build and check it unnamed.
FORMAT = Format(NAME, sniff, read, write, unnamed_build=always,
                unrepresentable=unrepresentable,
                read_as=read_named, runner="torch", write_as=write_as, output_bytes=tensor_bytes,
                naming=Naming(ANCHORS, (DENSE, SPARSE)))
