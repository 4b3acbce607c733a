"""timm's ConvNeXt V2 (``convnextv2_<size>``), in and out.

Written: one safetensors state dict in timm's names, loadable with
``timm.create_model("convnextv2_<size>", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``, and a
``<stem>.json`` beside it in the schema of timm's hub ``config.json`` (architecture, model_args,
pretrained_cfg with the preprocessing). Any output path not ending in ``.safetensors`` becomes timm's hub-style
folder (``model.safetensors`` + ``config.json``) for ``timm.create_model("local-dir:FOLDER", pretrained=True)``.

timm builds atto, femto, pico and nano with ``conv_mlp=True``: their MLP weights are 1x1 convolutions
(4C, C, 1, 1) and their block norm runs on NCHW; larger sizes use (4C, C). GRN weight/bias are (4C,).
Custom sizes have no registered timm name: the file is written with the layout chosen by ``conv_mlp``
(default: the source's, else False) and users build ``timm.models.convnext.ConvNeXt(depths=..., dims=...,
conv_mlp=..., use_grn=True, ls_init_value=None, num_classes=...)`` themselves (docs/hf_timm.md).

Read: timm safetensors files, and timm torch-zip state dicts through the safe reader, plus a hub-style
folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``), also inside a huggingface_hub cache
folder (``models--timm--NAME``, at ``refs/main`` or the revision asked for). Without a ``pretrained_cfg``
the preprocessing is assumed (timm's defaults), and marked so.

The JSON written carries every field timm's own ``save_for_hf`` writes for the same model (``global_pool``,
``model_args`` with ``in_chans``, ``pretrained_cfg`` with ``custom_load`` and the paper), except the record of
timm's registry entry (``tag``, ``license``, ``origin_url``), which a converted checkpoint cannot claim.
"""

from __future__ import annotations

import collections
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint, Preprocessing, Source
from convnextv2.converters.digests import source_digest
from convnextv2.converters.format_contract import Format, Naming, tensor_bytes
from convnextv2.converters.format_limits import Change, dropped_extras, fixed_head_norm_eps
from convnextv2.converters.progress import byte_progress
from convnextv2.converters.safetensors_io import write_safetensors
from convnextv2.converters.state_files import (
    SHARD_INDEX_FILES,
    HubFolder,
    hub_folder,
    peek_keys,
    read_weights,
    sniff_hub_folder,
)
from convnextv2.converters.strict_json import load_json
from convnextv2.converters.toolkit_metadata import embedded_metadata, restore_embedded
from convnextv2.converters.wrapped import candidate_prefixes, unwrap
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError, UnplacedKeysError
from convnextv2.reference.keymap import KeyTable, Rule
from convnextv2.reference.layouts import CONV_MLP, IDENTITY, TIMM_GRN, Layout
from convnextv2.reference.variants import IN_CHANNELS, ModelConfig, check_variant

NAME = "timm"
CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
# What timm's save_for_hf records of every ConvNeXt V2 (the architecture's paper, the head's pooling).
PAPER = {"paper_name": "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders",
         "paper_ids": "arXiv:2301.00808"}
GLOBAL_POOL = "avg"
# Sizes timm registers with 1x1-conv MLPs (timm/models/convnext.py: convnextv2_{atto,femto,pico,nano}).
CONV_MLP_VARIANTS = ("atto", "femto", "pico", "nano")

def _keys(mlp: Layout) -> KeyTable:
    return KeyTable([
        Rule("stem.0.{p}", "stem.conv.{p}"),
        Rule("stem.1.{p}", "stem.norm.{p}"),
        Rule("stages.{i}.downsample.0.{p}", "stages.{i}.downsample.norm.{p}"),
        Rule("stages.{i}.downsample.1.{p}", "stages.{i}.downsample.conv.{p}"),
        Rule("stages.{s}.blocks.{b}.conv_dw.{p}", "stages.{s}.blocks.{b}.dwconv.{p}"),
        Rule("stages.{s}.blocks.{b}.norm.{p}", "stages.{s}.blocks.{b}.norm.{p}"),
        Rule("stages.{s}.blocks.{b}.mlp.fc1.weight", "stages.{s}.blocks.{b}.pwconv1.weight", mlp),
        Rule("stages.{s}.blocks.{b}.mlp.fc1.bias", "stages.{s}.blocks.{b}.pwconv1.bias"),
        Rule("stages.{s}.blocks.{b}.mlp.grn.weight", "stages.{s}.blocks.{b}.grn.gamma", TIMM_GRN),
        Rule("stages.{s}.blocks.{b}.mlp.grn.bias", "stages.{s}.blocks.{b}.grn.beta", TIMM_GRN),
        Rule("stages.{s}.blocks.{b}.mlp.fc2.weight", "stages.{s}.blocks.{b}.pwconv2.weight", mlp),
        Rule("stages.{s}.blocks.{b}.mlp.fc2.bias", "stages.{s}.blocks.{b}.pwconv2.bias"),
        Rule("head.norm.{p}", "head.norm.{p}"),
        Rule("head.fc.{p}", "head.fc.{p}"),
    ])


# The MLP weights are linears (out, in) in KEYS and 1x1 convolutions (out, in, 1, 1) in CONV_MLP_KEYS.
KEYS = _keys(IDENTITY)
CONV_MLP_KEYS = _keys(CONV_MLP)


# The key every timm ConvNeXt state dict has (first block's depthwise weight): where it sits tells the prefix.
ANCHORS = ("stages.0.blocks.0.conv_dw.weight",)


def _looks_timm(keys: list[str]) -> bool:
    return bool(candidate_prefixes(keys, ANCHORS))


def _hub_weights(directory: Path) -> Path | None:
    for name in (*WEIGHTS_FILES, *SHARD_INDEX_FILES):
        if (directory / name).is_file():
            return directory / name
    return None


def _peek_weights(weights: Path) -> list[str]:
    if weights.name in SHARD_INDEX_FILES:
        try:
            weight_map = load_json(weights).get("weight_map")
        except BadInputError:
            return []
        return [str(k) for k in weight_map] if isinstance(weight_map, Mapping) else []
    return peek_keys(weights)


def _is_timm_config(path: Path) -> bool:
    try:
        data = load_json(path)
    except BadInputError:
        return False
    return str(data.get("architecture", "")).startswith("convnextv2")


def sniff(path: Path) -> bool:
    if path.is_dir():
        folder = sniff_hub_folder(path)
        if folder is None:
            return False
        weights = _hub_weights(folder)
        return (folder / CONFIG_FILE).is_file() and _is_timm_config(folder / CONFIG_FILE) and weights is not None \
            and _looks_timm(_peek_weights(weights))
    return path.is_file() and _looks_timm(peek_keys(path))


# ------------------------------------------------------------ reading

def state_dict_to_canonical(state: Mapping[str, np.ndarray], where: str) -> tuple[dict[str, np.ndarray], bool]:
    """timm keys -> canonical tensors; returns (tensors, whether the MLP weights were 1x1 convolutions)."""
    tensors: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    conv_mlp: set[bool] = set()
    for key, array in state.items():
        mapped = CONV_MLP_KEYS.to_canonical(key)
        if mapped is None:
            unknown.append(key)
            continue
        name, rule = mapped
        layout = rule.transform
        if layout is CONV_MLP:
            # The shape tells which MLP layout the file has; every MLP weight must agree (checked below).
            if not CONV_MLP.holds(array.shape):
                if array.ndim != 2:
                    raise BadInputError(
                        f"{where}: {key} should be (out, in) or (out, in, 1, 1), found {list(array.shape)}")
                layout = IDENTITY
            conv_mlp.add(layout is CONV_MLP)
        tensors[name] = layout.to_canonical(array, f"{where}: {key}")
    if unknown:
        raise UnplacedKeysError.in_state(where, NAME, state, unknown, "timm's ConvNeXt V2 naming")
    if len(conv_mlp) > 1:
        raise BadInputError(f"{where}: MLP weights mix 1x1-conv (4-D) and linear (2-D) shapes")
    return tensors, conv_mlp == {True}


def preprocessing_from_timm(cfg: Mapping[str, Any], where: str) -> Preprocessing:
    pre = cfg.get("pretrained_cfg", cfg)
    if not isinstance(pre, Mapping):
        raise BadInputError(f"{where}: pretrained_cfg must be a JSON object, found {type(pre).__name__}")
    if "input_size" not in pre:
        # timm then uses its defaults; they are what the checkpoint gets, but nothing in the file says so.
        defaults = Preprocessing().with_origin("assumed")
        warnings.warn(f"{where}: no pretrained_cfg input_size; preprocessing assumed to be timm's defaults "
                      f"({defaults.input_size}px, crop_pct {defaults.crop_pct})", UserWarning, stacklevel=3)
        return defaults
    try:
        size = pre.get("input_size", (3, 224, 224))
        return Preprocessing(
            input_size=int(size[-1]),
            crop_pct=float(pre.get("crop_pct", 0.875)),
            interpolation=str(pre.get("interpolation", "bicubic")),
            mean=tuple(float(x) for x in pre.get("mean", Preprocessing().mean)),  # type: ignore[arg-type]
            std=tuple(float(x) for x in pre.get("std", Preprocessing().std)),  # type: ignore[arg-type]
            crop_mode=str(pre.get("crop_mode", "center")),
        )
    except (TypeError, ValueError, IndexError, AttributeError) as exc:
        raise BadInputError(f"{where}: pretrained_cfg is malformed ({exc})") from None


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _config_beside(weights: Path) -> Path | None:
    for candidate in (_sidecar(weights), weights.parent / CONFIG_FILE):
        if candidate != weights and candidate.is_file() and _is_timm_config(candidate):
            return candidate
    return None


def read(path: Path, *, variant: str | None = None, revision: str | None = None, prefix: str | None = None
         ) -> Checkpoint:
    """``revision``: a branch, tag or commit of a huggingface_hub cache folder (default: main). ``prefix``:
    where the model sits in a wrapper's state dict (open_clip's ``visual.trunk.``), when several places hold one."""
    where = str(path)
    folder: HubFolder = hub_folder(path, revision)
    if folder.directory != path:
        where = f"{path} (revision {folder.revision}: snapshot {folder.commit})"
    if path.is_dir():
        weights = _hub_weights(folder.directory)
        if weights is None:
            raise BadInputError(f"{where}: no {', '.join((*WEIGHTS_FILES, *SHARD_INDEX_FILES))} in the directory")
    else:
        weights = path
    stored = read_weights(weights)
    meta = stored.metadata
    wrapped = unwrap(stored.state, ANCHORS, str(weights), NAME, prefix=prefix)
    try:
        tensors, conv_mlp = state_dict_to_canonical(wrapped.state, str(weights))
    except UnplacedKeysError as exc:
        raise exc.in_file_names(wrapped.file_names) from None
    config = schema.infer_config({k: v.shape for k, v in tensors.items()}, str(weights))
    embedded = restore_embedded(meta, str(weights))
    config_path = _config_beside(weights)
    timm_config: dict[str, Any] | None = None
    if config_path is not None:
        timm_config = load_json(config_path)
        declared = timm_config.get("model_args", {})
        if not isinstance(declared, Mapping):
            raise BadInputError(f"{config_path}: model_args must be a JSON object")
        for key, value in (("depths", list(config.depths)), ("dims", list(config.dims))):
            if key in declared and list(declared[key]) != value:
                raise BadInputError(f"{config_path}: model_args {key} {declared[key]} does not match the weights {value}")

    if embedded is not None:
        # timm runs every norm at 1e-6; our own files record the eps the checkpoint was made with.
        config = config.with_(head_norm_eps=embedded["config"].head_norm_eps)
        pre, source, info = embedded["preprocessing"], embedded["source"], embedded["info"]
        if timm_config is not None:
            from_file = preprocessing_from_timm(timm_config, str(config_path))
            if from_file != pre:
                pre = from_file  # the user edited the JSON: it is what timm will use
    else:
        if timm_config is not None:
            pre = preprocessing_from_timm(timm_config, str(config_path))
        else:
            pre = Preprocessing().with_origin("assumed")
            warnings.warn(f"{where}: no timm config.json or sidecar JSON; preprocessing assumed to be timm's "
                          f"defaults ({pre.input_size}px, crop_pct {pre.crop_pct})", UserWarning, stacklevel=2)
        digest = source_digest(folder.directory if path.is_dir() else path)
        source = Source(format=NAME, file_name=path.name, digest=digest,
                        layout={"conv_mlp": conv_mlp, "weights_file": weights.name, **folder.layout(),
                                **wrapped.layout()})
        info = {}
    if stored.skipped:  # a training checkpoint: what sat beside the weights is named, never interpreted
        info = {**info, "skipped": stored.skipped}
    ckpt = Checkpoint(config=config, tensors=tensors, preprocessing=pre, source=source, info=info)
    ckpt.validate(where)
    check_variant(config, variant, where)
    return ckpt


# ------------------------------------------------------------ writing

def default_conv_mlp(ckpt: Checkpoint) -> bool:
    if ckpt.source.format == NAME and "conv_mlp" in ckpt.source.layout:
        return bool(ckpt.source.layout["conv_mlp"])
    return ckpt.config.variant in CONV_MLP_VARIANTS


def canonical_to_state_dict(ckpt: Checkpoint, conv_mlp: bool) -> collections.OrderedDict[str, np.ndarray]:
    table = CONV_MLP_KEYS if conv_mlp else KEYS
    return collections.OrderedDict(
        (key, array) for key, _, array in table.to_foreign_tensors(ckpt.model_tensors(), "the timm layout"))


def timm_config_json(ckpt: Checkpoint, conv_mlp: bool) -> dict[str, Any]:
    """timm hub ``config.json`` schema: what timm needs to rebuild the model and prepare its inputs."""
    config: ModelConfig = ckpt.config
    pre = ckpt.preprocessing
    size = pre.input_size
    released = config.variant != "custom"
    model_args: dict[str, Any] = {
        "depths": list(config.depths), "dims": list(config.dims), "conv_mlp": conv_mlp,
        "use_grn": True, "ls_init_value": None, "num_classes": config.num_classes,
        "in_chans": IN_CHANNELS, "global_pool": GLOBAL_POOL,
    }
    data: dict[str, Any] = {
        # Custom sizes have no registered name; model_args carry the whole constructor.
        "architecture": f"convnextv2_{config.variant}" if released else "convnextv2_atto",
        "num_classes": config.num_classes,
        "num_features": config.dims[-1],
        "global_pool": GLOBAL_POOL,
        "model_args": model_args,
        "pretrained_cfg": {
            "custom_load": False,
            "input_size": [3, size, size],
            # A consumer overlaying this onto a registered model's pretrained_cfg (docs/hf_timm.md) must not
            # inherit that tag's test-time size; this checkpoint's is its own input size.
            "test_input_size": [3, size, size],
            "test_crop_pct": pre.crop_pct,
            "pool_size": [size // 32, size // 32],
            "crop_pct": pre.crop_pct,
            "crop_mode": pre.crop_mode,
            "interpolation": pre.interpolation,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "num_classes": config.num_classes,
            "first_conv": "stem.0",
            "classifier": "head.fc",
            "fixed_input_size": False,
            **PAPER,
        },
    }
    if not released:
        data["custom_size"] = ("no timm model is registered for these depths/dims; build "
                               "timm.models.convnext.ConvNeXt(**model_args) and load the state dict")
    return data


def unrepresentable(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    # timm's ConvNeXt has one norm_eps for every LayerNorm (1e-6 unless set); a final norm with another eps
    # (transformers' layer_norm_eps) cannot be stated without changing all the others.
    return fixed_head_norm_eps(ckpt, "a timm model") + dropped_extras(ckpt, "a timm model")


def write(ckpt: Checkpoint, path: Path, *, conv_mlp: bool | None = None) -> None:
    """``X.safetensors`` gets ``X.json`` beside it; any other path becomes a timm hub-style folder
    (``model.safetensors`` + ``config.json``) for ``timm.create_model("local-dir:PATH", pretrained=True)``.
    Written in place (converters.save makes it atomic). What a timm model cannot hold (extras, another final-norm
    eps) is declared by ``unrepresentable``, which converters.save announces; this writer drops the extras it is
    given (the eps goes into the metadata)."""
    ckpt.validate(f"writing {path}")
    folder = path.suffix != ".safetensors"
    if not ckpt.config.head_norm:
        warnings.warn(
            f"writing {path}: this encoder has no final LayerNorm (an FCMAE encoder) but timm's model has one; "
            "load it like timm's own FCMAE weights, non-strictly: "
            "timm.create_model('convnextv2_<size>.fcmae', pretrained=True, pretrained_cfg_overlay=dict(file=...))",
            UserWarning, stacklevel=2,
        )
    conv_mlp = default_conv_mlp(ckpt) if conv_mlp is None else conv_mlp
    if ckpt.config.variant in CONV_MLP_VARIANTS and not conv_mlp:
        warnings.warn(f"writing {path}: timm's convnextv2_{ckpt.config.variant} uses 1x1-conv MLP weights; this "
                      "file has linear ones and needs ConvNeXt(..., conv_mlp=False)", UserWarning, stacklevel=2)
    state = canonical_to_state_dict(ckpt, conv_mlp)
    metadata = {"format": "pt", **embedded_metadata(ckpt)}
    total = sum(int(a.size) * a.dtype.itemsize for a in state.values())
    config_text = json.dumps(timm_config_json(ckpt, conv_mlp), indent=2, sort_keys=True) + "\n"
    if folder:
        path.mkdir(exist_ok=True)
        with byte_progress(total, f"writing {path.name}") as bar:
            write_safetensors(path / WEIGHTS_FILES[0], list(state.items()), metadata, progress=bar)
            (path / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        return
    # The sidecar is a declared companion: converters.save publishes it before the weights, so that new weights
    # are never seen beside an old sidecar.
    _sidecar(path).write_text(config_text, encoding="utf-8")
    with byte_progress(total, f"writing {path.name}") as bar:
        write_safetensors(path, list(state.items()), metadata, progress=bar)


def companions(path: Path) -> tuple[str, ...]:
    """``X.safetensors`` has its sidecar ``X.json`` beside it; a folder holds its own files."""
    return (_sidecar(path).name,) if path.suffix == ".safetensors" else ()


FORMAT = Format(NAME, sniff, read, write, companions=companions, unrepresentable=unrepresentable, runner="timm",
                output_bytes=tensor_bytes, naming=Naming(ANCHORS, (CONV_MLP_KEYS,)))
