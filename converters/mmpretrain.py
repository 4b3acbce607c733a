"""OpenMMLab mmpretrain's ConvNeXt V2, in and out; and a ConvNeXt V2 backbone inside an mmdet / mmseg model.

mmpretrain 1.2 builds ConvNeXt V2 as ``ConvNeXt(arch, use_grn=True, layer_scale_init_value=0.)`` (``arch`` a
size name or ``dict(depths=[...], channels=[...])``) inside ``ImageClassifier(backbone=..., head=LinearClsHead)``,
without a neck: the backbone pools before its final norm itself (mmpretrain's ``configs/_base_/models/
convnext_v2/*.py``; a ``GlobalAveragePooling`` neck fails on the pooled output). Its checkpoints are torch zips
``{"meta": {...}, "state_dict": {...}}``; the state dict names, in mmpretrain's own order:

- ``backbone.downsample_layers.0.{0,1}.*``: the stem (4x4 conv, LayerNorm); ``downsample_layers.{1..3}.{0,1}.*``
  the downsampling (LayerNorm, 2x2 conv), as the facebookresearch original;
- ``backbone.stages.{s}.{b}.{depthwise_conv,norm,pointwise_conv1,pointwise_conv2}.*`` (the pointwise layers are
  Linears (4C, C)), then ``.grn.gamma`` / ``.grn.beta`` shaped (4C,);
- ``backbone.norm3.*``: a classifier's final LayerNorm, applied after global pooling (``gap_before_final_norm``);
  ``head.fc.*``: the classifier. Every LayerNorm runs at eps 1e-6 (``norm_cfg=dict(type='LN2d', eps=1e-6)``).

Read: such a file, with or without ``meta``, with the model under ``backbone.`` or under any other prefix
(``module.backbone.``, a bare backbone state dict; converters/wrapped.py finds it by the anchor key and
``--prefix`` chooses between several). Beside the weights, ``meta`` is kept as plain JSON data in
``Source.layout["meta"]`` (``class_names`` finds the class names in it); other entries of a training checkpoint
(``message_hub``, ``optimizer``...) are skipped and named in ``info["skipped"]``. The preprocessing is
read where the file states it: a training run's config, which mmengine's Runner keeps in ``meta["cfg"]``
(converters/mmengine_config.py parses it, never runs it: its ``data_preprocessor`` mean/std and its test
pipeline's ResizeEdge + CenterCrop or square Resize); then ``data_preprocessor.mean`` / ``.std`` buffers (shape
(3, 1, 1), 0-255 scale; usually non-persistent, but some files carry them), which state mean and std only.
Whatever is not stated is assumed: mmpretrain's ImageNet test pipeline for ConvNeXt V2
(``configs/_base_/datasets/imagenet_bs64_swin_224.py``: ResizeEdge short side 256 bicubic, CenterCrop 224), or at
384/512 px (``-384px`` in the file name) a plain bicubic resize, which are the toolkit's
``Preprocessing.for_resolution``; with nothing stated at all, the preprocessing is marked assumed.

A detection / segmentation backbone (mmdet, mmseg: ``out_indices=(0, 1, 2, 3)``, ``gap_before_final_norm=False``)
has one LayerNorm per output stage, ``backbone.norm{0..3}``, applied to each stage's feature map: it reads as a
headless checkpoint whose stage norms are kept verbatim as extras ``extras.mmpretrain.norm{i}.*``; the neck and
heads are left behind and counted by group (``Source.layout["left_behind"]``).

Written: ``{"meta": ..., "state_dict": OrderedDict}`` in mmpretrain's key order, which mmpretrain 1.2 loads with
``strict=True`` into ``ImageClassifier(backbone=ConvNeXt(arch=dict(depths=..., channels=...), use_grn=True,
layer_scale_init_value=0.), head=LinearClsHead(num_classes, in_channels))``; the model
is always under ``backbone.`` (an ImageClassifier's state dict, whatever prefix it was read from). ``meta`` is the
source's own (when it was an mmpretrain file) plus ``meta["convnextv2-toolkit"]``, the toolkit's canonical
metadata (config, preprocessing, source, info), so that preprocessing, the final-norm eps and the provenance
survive mmpretrain -> canonical -> mmpretrain, which is bit for bit (what was skipped beside the source's weights
is not carried: the file written holds none of it). ``data_preprocessor.mean/std`` are written back only where the
source file had them (strict loading refuses them where the buffers are non-persistent), with their very values
unless the preprocessing was changed since.

Headless checkpoints: with a final norm, ``backbone.*`` including ``norm3`` and no ``head``; without one (an FCMAE
encoder), ``backbone.*`` without any ``norm`` -- the form of mmpretrain's FCMAE encoders converted from the
facebookresearch ``pt_only`` files (``convnext-v2-*_3rdparty-fcmae_in1k``), which hold no norm; ConvNeXt loads
such a file non-strictly, through ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')`` as
mmdet / mmseg do. No norm is invented. A detector
backbone's stage norms (the extras above) are written back as ``backbone.norm{i}``: the file then loads into
``ConvNeXt(out_indices=(0, 1, 2, 3), gap_before_final_norm=False)`` the same way. What the format cannot hold is
declared (``unrepresentable``): a final-norm eps other than 1e-6, and any other extras.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint, Preprocessing, Source
from convnextv2.converters.digests import lazy_sha256
from convnextv2.converters.format_contract import Format, Naming, always, tensor_bytes
from convnextv2.converters.format_limits import Change, dropped_extras, fixed_head_norm_eps
from convnextv2.converters.mmengine_config import PIXEL_SCALE, stated_preprocessing
from convnextv2.converters.progress import byte_progress
from convnextv2.converters.state_files import peek_keys, plain_data, select_weights
from convnextv2.converters.strict_json import parse_json_text
from convnextv2.converters.toolkit_metadata import EMBEDDED_PREFIX, restore_embedded
from convnextv2.converters.torchzip import is_torch_zip, read_torch_zip, write_torch_zip
from convnextv2.converters.wrapped import candidate_prefixes, unwrap
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError, UnplacedKeysError
from convnextv2.reference.keymap import KeyTable, Rule
from convnextv2.reference.layouts import TIMM_GRN
from convnextv2.reference.variants import check_variant

NAME = "mmpretrain"
EXTRAS_NAMESPACE = "extras.mmpretrain."
BACKBONE = "backbone."
# Where the toolkit's canonical metadata rides in ``meta`` (the same name as in foreign safetensors files).
TOOLKIT_META = EMBEDDED_PREFIX.rstrip(".")
# The key every mmpretrain ConvNeXt state dict has (first block's depthwise weight): where it sits tells the prefix.
ANCHORS = ("stages.0.0.depthwise_conv.weight",)
# ClsDataPreprocessor's buffers, when a file carries them: (3, 1, 1), RGB, on the 0-255 scale (PIXEL_SCALE).
PREPROCESSOR = "data_preprocessor."

# Names relative to the backbone; the classifier ``head.fc`` sits beside it. GRN is (4C,) as in timm.
TABLE = KeyTable([
    Rule("downsample_layers.0.0.{p}", "stem.conv.{p}"),
    Rule("downsample_layers.0.1.{p}", "stem.norm.{p}"),
    Rule("downsample_layers.{i}.0.{p}", "stages.{i}.downsample.norm.{p}"),
    Rule("downsample_layers.{i}.1.{p}", "stages.{i}.downsample.conv.{p}"),
    Rule("stages.{s}.{b}.depthwise_conv.{p}", "stages.{s}.blocks.{b}.dwconv.{p}"),
    Rule("stages.{s}.{b}.norm.{p}", "stages.{s}.blocks.{b}.norm.{p}"),
    Rule("stages.{s}.{b}.pointwise_conv1.{p}", "stages.{s}.blocks.{b}.pwconv1.{p}"),
    Rule("stages.{s}.{b}.pointwise_conv2.{p}", "stages.{s}.blocks.{b}.pwconv2.{p}"),
    Rule("stages.{s}.{b}.grn.{p}", "stages.{s}.blocks.{b}.grn.{p}", TIMM_GRN),
    Rule("norm3.{p}", "head.norm.{p}"),
    Rule("head.fc.{p}", "head.fc.{p}"),
])

# A detector backbone's per-stage output norms (also norm3 once any of norm0..2 is present).
_STAGE_NORM = re.compile(r"^norm([0-3])\.(weight|bias)$")
# Registration order inside a block (the state dict's order), which differs from the canonical forward order.
_BLOCK_ORDER = {"depthwise_conv": 0, "norm": 1, "pointwise_conv1": 2, "pointwise_conv2": 3, "grn": 4}


# ------------------------------------------------------------ reading

def sniff(path: Path) -> bool:
    # A torch zip is claimed only when its keys hold mmpretrain's anchor (the original reader takes every other).
    return path.is_file() and is_torch_zip(path) and bool(candidate_prefixes(peek_keys(path), ANCHORS))


def _scaled(values: np.ndarray) -> tuple[float, float, float]:
    # The shortest decimal that gives the stored value (123.675, not 123.67500305) over 255, rounded where
    # float64 leaves a last-digit remainder: written back, it gives the same stored bits.
    out = [round(float(np.format_float_positional(v, unique=True)) / PIXEL_SCALE, 12) for v in values]
    return (out[0], out[1], out[2])


def _stated_preprocessing(state: dict[str, np.ndarray], where: str) -> dict[str, Any] | None:
    """The file's ``data_preprocessor`` buffers, removed from ``state``, as the source records them (their dtype
    and stored values, 0-255); None when it has none."""
    keys = [PREPROCESSOR + "mean", PREPROCESSOR + "std"]
    if not any(k in state for k in keys):
        return None
    found = [state.pop(k, None) for k in keys]
    values: list[np.ndarray] = []
    for index, (key, array) in enumerate(zip(keys, found, strict=True)):
        if array is None or array.size != 3 or not np.issubdtype(array.dtype, np.floating):
            shown = "absent" if array is None else f"{array.dtype} {list(array.shape)}"
            raise BadInputError(f"{where}: {key}: expected 3 floats (shape (3, 1, 1)) beside {keys[1 - index]}, "
                                f"found {shown}")
        vector = np.asarray(array, np.float64).reshape(3)
        if not (np.all(np.isfinite(vector)) and (index == 0 or np.all(vector > 0))):
            raise BadInputError(f"{where}: {key}: expected {'positive ' if index else ''}finite values, found "
                                f"{vector.tolist()}")
        values.append(np.asarray(array).reshape(3))
    return {"dtype": str(values[0].dtype), "mean": [float(v) for v in values[0]],
            "std": [float(v) for v in values[1]]}


def _stated_pixels(stated: Mapping[str, Any]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    dtype = np.dtype(stated["dtype"])
    return (_scaled(np.asarray(stated["mean"], dtype)), _scaled(np.asarray(stated["std"], dtype)))


def _preprocessing_from_run(pre: Preprocessing, config_text: Any, where: str) -> Preprocessing:
    """What the training run's config (mmengine's ``meta["cfg"]``) states over ``pre``: its data preprocessor's
    mean and std, its test pipeline's size, crop and interpolation."""
    stated = stated_preprocessing(config_text)
    if not stated.pop("rgb", True):
        # The toolkit's preprocessing feeds RGB; a model trained on BGR needs its channels swapped first.
        warnings.warn(f"{where}: the run's config feeds the model BGR images (data_preprocessor to_rgb=False); its "
                      "mean and std are not taken, and images must reach this model as BGR", UserWarning, stacklevel=4)
        stated.pop("mean", None)
        stated.pop("std", None)
    return dataclasses.replace(pre, **stated).with_origin("read") if stated else pre


def state_dict_to_canonical(state: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Rename an mmpretrain state dict (backbone-relative names, ``head.fc`` beside them) to canonical tensors;
    a detector backbone's stage norms become extras."""
    per_stage = any(f"norm{i}.weight" in state for i in range(3))
    if per_stage and any(k.startswith("head.") for k in state):
        raise BadInputError(f"{where}: per-stage output norms (backbone.norm0..3, a detector backbone) beside a "
                            "classifier head: expected one or the other")
    tensors: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for key, array in state.items():
        if per_stage and _STAGE_NORM.match(key):
            tensors[EXTRAS_NAMESPACE + key] = array
            continue
        mapped = TABLE.to_canonical(key)
        if mapped is None:
            unknown.append(key)
            continue
        name, rule = mapped
        tensors[name] = rule.transform.to_canonical(array, f"{where}: {key}")
    if unknown:
        raise UnplacedKeysError.in_state(where, NAME, state, unknown, "the mmpretrain ConvNeXt V2 layout")
    return tensors


def _toolkit_fields(meta: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """The canonical metadata our writer embedded in ``meta``, parsed (None when absent or unreadable)."""
    fields = meta.get(TOOLKIT_META)
    if not isinstance(fields, Mapping):
        return None
    return restore_embedded({EMBEDDED_PREFIX + str(k): v for k, v in fields.items()}, f"{where}: meta")


def read(path: Path, *, variant: str | None = None, prefix: str | None = None) -> Checkpoint:
    """``prefix``: where the model sits in a wrapper's state dict (``backbone.``, ``student.backbone.``), when
    several places hold one."""
    return read_named(path, path.name, variant=variant, prefix=prefix)


def read_named(path: Path, file_name: str, *, variant: str | None = None, prefix: str | None = None) -> Checkpoint:
    """``read`` of a file as though it were called ``file_name`` (an assumed preprocessing comes from the name)."""
    where = str(path)
    weights = select_weights(read_torch_zip(path), where, keep=("meta",))
    raw_meta = weights.kept.get("meta")
    if raw_meta is not None and not isinstance(raw_meta, Mapping):
        raise BadInputError(f"{where}: 'meta' is a {type(raw_meta).__name__}, expected a dict")
    embedded = _toolkit_fields(raw_meta or {}, where)
    meta = {str(k): plain_data(v) for k, v in (raw_meta or {}).items() if k != TOOLKIT_META}
    # The classifier's head and the data preprocessor sit beside the backbone, in the model that holds it.
    wrapped = unwrap(weights.state, ANCHORS, where, NAME, prefix=prefix, keep_outside=("head.", PREPROCESSOR))
    state = dict(wrapped.state)
    stated = _stated_preprocessing(state, where)
    try:
        tensors = state_dict_to_canonical(state, where)
    except UnplacedKeysError as exc:
        raise exc.in_file_names(wrapped.file_names) from None
    config = schema.infer_config({k: v.shape for k, v in tensors.items()}, where)

    pre = _preprocessing_from_run(Preprocessing.assumed_from_file_name(file_name), meta.get("cfg"), where)
    if stated is not None:
        mean, std = _stated_pixels(stated)
        pre = dataclasses.replace(pre, mean=mean, std=std).with_origin("read")
    layout: dict[str, Any] = {"meta": meta, **wrapped.layout()}
    if stated is not None:
        layout["data_preprocessor"] = stated
    source = Source(format=NAME, file_name=file_name, digest=lazy_sha256(path), layout=layout)
    info: dict[str, Any] = {"container": weights.container}
    if weights.skipped:
        info["skipped"] = weights.skipped
    if embedded is not None:
        # Our own file: the final-norm eps, preprocessing, provenance and info it was written from. The file's
        # data preprocessor and meta are what mmpretrain uses, so they win where someone has changed them since.
        config = config.with_(head_norm_eps=embedded["config"].head_norm_eps)
        if stated is None or (embedded["preprocessing"].mean, embedded["preprocessing"].std) == (pre.mean, pre.std):
            pre = embedded["preprocessing"]
        info = {**embedded["info"], **({"skipped": weights.skipped} if weights.skipped else {})}
        restored: Source = embedded["source"]
        if restored.format == NAME:
            restored.layout["meta"] = meta
            source = restored
        elif not meta:
            source = restored
    ckpt = Checkpoint(config=config, tensors=tensors, preprocessing=pre, source=source, info=info)
    ckpt.validate(where)
    check_variant(config, variant, where)
    return ckpt


def class_names(ckpt: Checkpoint) -> list[str] | None:
    """The class names an mmpretrain file's meta states for its head (mmengine's ``dataset_meta.classes``, or
    mmcls 0.x's ``CLASSES``), when there is one per class; else None."""
    meta = ckpt.source.layout.get("meta") if ckpt.source.format == NAME else None
    if not isinstance(meta, Mapping) or ckpt.config.num_classes == 0:
        return None
    dataset = meta.get("dataset_meta")
    names = dataset.get("classes") if isinstance(dataset, Mapping) else meta.get("CLASSES")
    if isinstance(names, list) and len(names) == ckpt.config.num_classes and all(isinstance(n, str) for n in names):
        return names
    return None


# ------------------------------------------------------------ writing

def _order(key: str) -> tuple[int, ...]:
    """mmpretrain's registration order: data preprocessor, downsample layers, stages (each block's own order),
    the output norms, then the head."""
    parts = key.split(".")
    if parts[0] == "data_preprocessor":
        return (0,)
    if parts[0] == "head":
        return (5,)
    parts = parts[1:]  # below "backbone."
    if parts[0] == "downsample_layers":
        return (1, int(parts[1]), int(parts[2]))
    if parts[0] == "stages":
        return (2, int(parts[1]), int(parts[2]), _BLOCK_ORDER[parts[3]])
    return (3, int(parts[0][len("norm"):]), 0 if parts[1] == "weight" else 1)


def _written_extras(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The extras this format holds: a detector backbone's stage norms, for a checkpoint without a final norm
    (with one, ``norm3`` is the final norm)."""
    if ckpt.config.head_norm:
        return {}
    return {name: array for name, array in sorted(ckpt.extras().items())
            if name.startswith(EXTRAS_NAMESPACE) and _STAGE_NORM.match(name[len(EXTRAS_NAMESPACE):])}


def _preprocessor_buffers(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The data preprocessor's buffers, where the source file had them: its very values while the preprocessing
    is the one they state, else the checkpoint's mean and std on the 0-255 scale."""
    stated = ckpt.source.layout.get("data_preprocessor") if ckpt.source.format == NAME else None
    if not isinstance(stated, Mapping) or stated.get("dtype") not in ("float16", "float32", "float64"):
        return {}
    dtype = np.dtype(stated["dtype"])
    pre = ckpt.preprocessing
    if _stated_pixels(stated) == (pre.mean, pre.std):
        mean, std = np.asarray(stated["mean"], dtype), np.asarray(stated["std"], dtype)
    else:
        mean, std = ((np.asarray(v, np.float64) * PIXEL_SCALE).astype(dtype) for v in (pre.mean, pre.std))
    return {PREPROCESSOR + "mean": mean.reshape(3, 1, 1), PREPROCESSOR + "std": std.reshape(3, 1, 1)}


def canonical_to_state_dict(ckpt: Checkpoint) -> collections.OrderedDict[str, np.ndarray]:
    entries = [((key if key.startswith("head.") else BACKBONE + key), array)
               for key, _, array in TABLE.to_foreign_tensors(ckpt.model_tensors(), "the mmpretrain layout")]
    entries += [(BACKBONE + name[len(EXTRAS_NAMESPACE):], array) for name, array in _written_extras(ckpt).items()]
    entries += list(_preprocessor_buffers(ckpt).items())
    entries.sort(key=lambda item: _order(item[0]))  # stable: weight before bias, gamma before beta
    return collections.OrderedDict(entries)


def toolkit_meta(ckpt: Checkpoint) -> dict[str, Any]:
    """The toolkit's canonical metadata as plain data, for ``meta["convnextv2-toolkit"]``."""
    fields = ckpt.metadata()
    fields.pop("format", None)
    meta = {key: (parse_json_text(value, f"metadata {key!r}") if key in ("config", "preprocessing", "source", "info")
                  else value) for key, value in fields.items()}
    # What was skipped beside the weights of the file read is not in the file written (and reading it says so).
    meta["info"].pop("skipped", None)
    return meta


def written_meta(ckpt: Checkpoint) -> dict[str, Any]:
    """The source's own meta when it was an mmpretrain file, and the toolkit's metadata."""
    own = ckpt.source.layout.get("meta") if ckpt.source.format == NAME else None
    meta = dict(own) if isinstance(own, Mapping) else {}
    meta[TOOLKIT_META] = toolkit_meta(ckpt)
    return meta


def unrepresentable(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    # Every mmpretrain LayerNorm runs at one eps (norm_cfg, 1e-6); its extras are a detector's stage norms only.
    target = "an mmpretrain model"
    return fixed_head_norm_eps(ckpt, target) + dropped_extras(ckpt, target, list(_written_extras(ckpt)))


def write(ckpt: Checkpoint, path: Path) -> None:
    """The torch zip at ``path`` (written in place; converters.save makes it atomic)."""
    write_as(ckpt, path, path)


def write_as(ckpt: Checkpoint, path: Path, dest: Path) -> None:
    """As torch.save does, the zip's archive name is the file's stem: ``dest``'s, while ``path`` is unnamed.
    What mmpretrain cannot hold is declared by ``unrepresentable`` (converters.save hands this writer the
    checkpoint as the target holds it); the eps a caller gives goes into the toolkit metadata."""
    ckpt.validate(f"writing {dest}")
    state = canonical_to_state_dict(ckpt)
    container = {"meta": written_meta(ckpt), "state_dict": state}
    total = sum(int(a.size) * a.dtype.itemsize for a in state.values())
    with byte_progress(total, f"writing {dest.name}") as bar:
        write_torch_zip(path, container, archive_name=dest.stem or "archive", progress=bar)


# One torch zip read by content (read_named supplies the name an assumed preprocessing comes from): conversions
# build and check it unnamed.
FORMAT = Format(NAME, sniff, read, write, unnamed_build=always, unrepresentable=unrepresentable,
                read_as=read_named, runner="torch", write_as=write_as, output_bytes=tensor_bytes,
                naming=Naming(ANCHORS, (TABLE,)))
