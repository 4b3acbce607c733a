"""Hugging Face transformers ConvNeXt V2, in and out.

Written: a directory ``transformers.ConvNextV2ForImageClassification.from_pretrained`` (``ConvNextV2Model``
when headless) loads with no missing or unexpected keys: ``config.json``, ``model.safetensors`` (metadata
``format: pt``, which the TF classes need for ``from_pt=True``) and ``preprocessor_config.json``.

Read: such directories, and bare HF state dicts (safetensors, or ``pytorch_model.bin`` through the safe
reader), with or without the ``convnextv2.`` prefix of the classification model.

HF's final pooled LayerNorm takes ``layer_norm_eps`` from config.json (default 1e-12); every other norm is
fixed at 1e-6. That eps is carried as ``ModelConfig.head_norm_eps`` so every reference computes what HF
computes; a warning says the original uses 1e-6.

Our canonical metadata rides along in the safetensors metadata (``converters.toolkit_metadata``): reading
it back restores the exact preprocessing, source and info, which makes hf -> canonical -> hf byte-identical.
"""

from __future__ import annotations

import collections
import functools
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.atomic import atomic_directory
from convnextv2.converters.checkpoint import Checkpoint, Preprocessing, Source
from convnextv2.converters.digests import source_digest
from convnextv2.converters.progress import byte_progress
from convnextv2.converters.safetensors_io import write_safetensors
from convnextv2.converters.state_files import peek_keys, read_state_file
from convnextv2.converters.strict_json import load_json
from convnextv2.converters.toolkit_metadata import embedded_metadata, restore_embedded
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.keymap import KeyTable, Rule
from convnextv2.reference.layouts import HF_GRN
from convnextv2.reference.variants import (
    IN_CHANNELS,
    LAYER_NORM_EPS,
    NUM_STAGES,
    ModelConfig,
    check_variant,
)

NAME = "hf"
CONFIG_FILE = "config.json"
SAFE_WEIGHTS_FILE = "model.safetensors"
BIN_WEIGHTS_FILE = "pytorch_model.bin"
# save_pretrained shards large models (max_shard_size) into files listed by one of these indexes.
SHARD_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PREPROCESSOR_FILE = "preprocessor_config.json"
MODEL_PREFIX = "convnextv2."
CLASSIFY_ARCH = "ConvNextV2ForImageClassification"
HEADLESS_ARCH = "ConvNextV2Model"
# transformers' default for layer_norm_eps when a config omits it.
HF_DEFAULT_LAYER_NORM_EPS = 1e-12
PATCH_SIZE = 4
# PIL resampling codes, which ConvNextImageProcessor stores as ``resample``.
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
# HF's processor warps (no crop) at 384 px and above, and resizes-then-centre-crops below.
HF_SQUASH_FROM = 384

# The classification model's base-model keys carry MODEL_PREFIX; the classifier (this rule) never does.
CLASSIFIER = Rule("classifier.{p}", "head.fc.{p}")
KEYS = KeyTable([
    Rule("embeddings.patch_embeddings.{p}", "stem.conv.{p}"),
    Rule("embeddings.layernorm.{p}", "stem.norm.{p}"),
    Rule("encoder.stages.{i}.downsampling_layer.0.{p}", "stages.{i}.downsample.norm.{p}"),
    Rule("encoder.stages.{i}.downsampling_layer.1.{p}", "stages.{i}.downsample.conv.{p}"),
    Rule("encoder.stages.{s}.layers.{b}.dwconv.{p}", "stages.{s}.blocks.{b}.dwconv.{p}"),
    Rule("encoder.stages.{s}.layers.{b}.layernorm.{p}", "stages.{s}.blocks.{b}.norm.{p}"),
    Rule("encoder.stages.{s}.layers.{b}.pwconv1.{p}", "stages.{s}.blocks.{b}.pwconv1.{p}"),
    Rule("encoder.stages.{s}.layers.{b}.grn.weight", "stages.{s}.blocks.{b}.grn.gamma", HF_GRN),
    Rule("encoder.stages.{s}.layers.{b}.grn.bias", "stages.{s}.blocks.{b}.grn.beta", HF_GRN),
    Rule("encoder.stages.{s}.layers.{b}.pwconv2.{p}", "stages.{s}.blocks.{b}.pwconv2.{p}"),
    Rule("layernorm.{p}", "head.norm.{p}"),
    CLASSIFIER,
])


# ------------------------------------------------------------ transformers specifics

def check_transformers_version(version: str | None = None) -> None:
    """transformers 4.51.x computes GRN with a spectral (matrix) norm; its outputs are wrong
    (4.50 and older, 4.52 and newer are right)."""
    if version is None:
        import importlib.metadata

        try:
            version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            return
    if version.startswith("4.51."):
        warnings.warn(
            f"transformers {version} computes ConvNeXt V2's GRN with a spectral norm instead of the L2 norm over "
            "H and W, so its outputs are wrong; use transformers <= 4.50 or >= 4.52 (the files themselves are fine)",
            RuntimeWarning, stacklevel=3,
        )


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=1)
def imagenet1k_labels() -> dict[str, list[str]]:
    """ImageNet-1k synsets and class descriptions, bundled (generated from timm by tools/make_imagenet1k_labels.py)."""
    data = json.loads((Path(__file__).with_name("data") / "imagenet1k_labels.json").read_text(encoding="utf-8"))
    return {"synsets": list(data["synsets"]), "descriptions": list(data["descriptions"])}


# ------------------------------------------------------------ sniffing

def _is_hf_config(path: Path) -> bool:
    try:
        data = load_json(path)
    except BadInputError:
        return False
    return data.get("model_type") == "convnextv2"


def _weights_file(directory: Path) -> Path | None:
    for name in (SAFE_WEIGHTS_FILE, BIN_WEIGHTS_FILE, *SHARD_INDEX_FILES):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_weights(weights: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """One weights file, or every shard an index lists, merged (metadata from the first shard)."""
    if weights.name not in SHARD_INDEX_FILES:
        return read_state_file(weights, str(weights))
    index = load_json(weights)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise BadInputError(f"{weights}: shard index has no weight_map")
    state: dict[str, np.ndarray] = {}
    meta: dict[str, str] = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        shard_path = weights.parent / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise BadInputError(f"{weights}: shard {shard!r} is missing from the directory")
        tensors, shard_meta = read_state_file(shard_path, str(shard_path))
        meta = meta or shard_meta
        state.update(tensors)
    missing = sorted(set(map(str, weight_map)) - set(state))
    if missing:
        raise BadInputError(f"{weights}: {len(missing)} tensor(s) listed in the index are in no shard: {missing[:5]}")
    return state, meta


def _looks_hf(keys: list[str]) -> bool:
    stem = "embeddings.patch_embeddings.weight"
    return stem in keys or MODEL_PREFIX + stem in keys


def sniff(path: Path) -> bool:
    if path.is_dir():
        return (path / CONFIG_FILE).is_file() and _is_hf_config(path / CONFIG_FILE) and _weights_file(path) is not None
    return path.is_file() and _looks_hf(peek_keys(path))


# ------------------------------------------------------------ reading

def state_dict_to_canonical(state: Mapping[str, np.ndarray], where: str) -> tuple[dict[str, np.ndarray], bool]:
    """HF keys -> canonical tensors; returns (tensors, whether the base keys had the ``convnextv2.`` prefix)."""
    prefixed = any(k.startswith(MODEL_PREFIX) for k in state)
    tensors: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for key, array in state.items():
        base = key
        if prefixed and key.startswith(MODEL_PREFIX):
            base = key[len(MODEL_PREFIX):]
        mapped = KEYS.to_canonical(base)
        # With the prefix every base-model key must carry it; the classifier never does.
        if mapped is None or (prefixed and (base == key) != (mapped[1] is CLASSIFIER)):
            unknown.append(f"{key} {list(array.shape)}")
            continue
        name, rule = mapped
        tensors[name] = rule.transform.to_canonical(array, f"{where}: {key}")
    if unknown:
        raise BadInputError(f"{where}: {len(unknown)} key(s) are not ConvNeXt V2 transformers keys: {', '.join(unknown[:10])}")
    return tensors, prefixed


def _check_config(hf_config: Mapping[str, Any], config: ModelConfig, where: str) -> None:
    """Every field of config.json that fixes shapes or numerics must agree with the weights."""
    if hf_config.get("model_type") != "convnextv2":
        raise BadInputError(f"{where}: model_type is {hf_config.get('model_type')!r}, not 'convnextv2'")
    expected = {
        "depths": list(config.depths), "hidden_sizes": list(config.dims), "num_channels": IN_CHANNELS,
        "num_stages": NUM_STAGES, "patch_size": PATCH_SIZE, "hidden_act": "gelu",
    }
    problems = []
    for key, value in expected.items():
        if key in hf_config and hf_config[key] != value:
            problems.append(f"{key} is {hf_config[key]!r} in config.json but the weights have {value!r}")
    labels = hf_config.get("id2label")
    if config.num_classes and isinstance(labels, Mapping) and len(labels) != config.num_classes:
        problems.append(f"id2label has {len(labels)} classes but the classifier has {config.num_classes}")
    if problems:
        raise BadInputError(f"{where}: config.json does not match the weights: " + "; ".join(problems))


def preprocessing_from_hf(data: Mapping[str, Any], where: str) -> Preprocessing:
    size = data.get("size", {})
    edge: Any = size.get("shortest_edge") if isinstance(size, Mapping) else size
    try:
        edge = int(edge)
        resample = int(data.get("resample", PIL_RESAMPLE["bicubic"]))
        interpolation = next(k for k, v in PIL_RESAMPLE.items() if v == resample)
        squash = edge >= HF_SQUASH_FROM
        return Preprocessing(
            input_size=edge,
            # At 384 and above HF ignores crop_pct and warps; record what it does.
            crop_pct=1.0 if squash else float(data.get("crop_pct", 224 / 256)),
            interpolation=interpolation,
            mean=tuple(float(x) for x in data.get("image_mean", Preprocessing().mean)),  # type: ignore[arg-type]
            std=tuple(float(x) for x in data.get("image_std", Preprocessing().std)),  # type: ignore[arg-type]
            crop_mode="squash" if squash else "center",
        )
    except (TypeError, ValueError, StopIteration) as exc:
        raise BadInputError(f"{where}: preprocessor_config.json is not a ConvNextImageProcessor config ({exc})") from None


def preprocessor_json(pre: Preprocessing) -> dict[str, Any]:
    return {
        "crop_pct": pre.crop_pct,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(pre.mean),
        "image_processor_type": "ConvNextImageProcessor",
        "image_std": list(pre.std),
        "resample": PIL_RESAMPLE.get(pre.interpolation, PIL_RESAMPLE["bicubic"]),
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": pre.input_size},
    }


def _hf_represents(pre: Preprocessing) -> bool:
    squash = pre.input_size >= HF_SQUASH_FROM
    if pre.interpolation not in PIL_RESAMPLE:
        return False
    return (pre.crop_mode == "squash") == squash or (not squash and pre.crop_pct == 1.0)


def _config_number(hf_config: Mapping[str, Any], key: str, default: Any, kind: Any, where: str) -> Any:
    value = hf_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        raise BadInputError(f"{where}: config.json {key} must be a positive number, found {value!r}")
    return kind(value)


def _warn_eps(eps: float, where: str) -> None:
    if eps != LAYER_NORM_EPS:
        warnings.warn(
            f"{where}: the final LayerNorm uses eps {eps:g} (transformers' layer_norm_eps); the original ConvNeXt V2 "
            f"uses {LAYER_NORM_EPS:g}. The eps is kept so outputs match transformers exactly.",
            UserWarning, stacklevel=3,
        )


def read(path: Path, *, variant: str | None = None) -> Checkpoint:
    check_transformers_version()
    where = str(path)
    hf_config: dict[str, Any] | None = None
    preprocessor: dict[str, Any] | None = None
    directory = path if path.is_dir() else path.parent
    if path.is_dir():
        weights = _weights_file(path)
        if weights is None:
            raise BadInputError(f"{where}: no {SAFE_WEIGHTS_FILE}, {BIN_WEIGHTS_FILE} or shard index in the directory")
        if not (path / CONFIG_FILE).is_file():
            raise BadInputError(f"{where}: no {CONFIG_FILE} in the directory")
    else:
        weights = path
    # A bare state dict may sit beside its config (a file inside a model directory).
    if (directory / CONFIG_FILE).is_file() and (path.is_dir() or _is_hf_config(directory / CONFIG_FILE)):
        hf_config = load_json(directory / CONFIG_FILE)
    if (directory / PREPROCESSOR_FILE).is_file() and hf_config is not None:
        preprocessor = load_json(directory / PREPROCESSOR_FILE)

    state, meta = _read_weights(weights)
    tensors, prefixed = state_dict_to_canonical(state, str(weights))
    config = schema.infer_config({k: v.shape for k, v in tensors.items()}, str(weights))
    embedded = restore_embedded(meta, str(weights))

    if hf_config is not None:
        _check_config(hf_config, config, where)
        eps = _config_number(hf_config, "layer_norm_eps", HF_DEFAULT_LAYER_NORM_EPS, float, where)
    elif embedded is not None:
        eps = embedded["config"].head_norm_eps
    else:
        eps = LAYER_NORM_EPS  # a bare state dict says nothing; assume the original's value
    if config.head_norm:
        config = config.with_(head_norm_eps=eps)
        _warn_eps(eps, where)

    # A headless encoder without a final norm went out with a unit placeholder norm (see write): drop it.
    if embedded is not None and not embedded["config"].head_norm and config.head_norm and config.num_classes == 0:
        weight, bias = tensors["head.norm.weight"], tensors["head.norm.bias"]
        if np.all(weight == 1) and np.all(bias == 0):
            del tensors["head.norm.weight"], tensors["head.norm.bias"]
            config = config.with_(head_norm=False, head_norm_eps=embedded["config"].head_norm_eps)

    if preprocessor is not None:
        pre = preprocessing_from_hf(preprocessor, str(directory / PREPROCESSOR_FILE))
    elif hf_config is not None and "image_size" in hf_config:
        pre = Preprocessing.for_resolution(_config_number(hf_config, "image_size", 224, int, where))
    else:
        pre = embedded["preprocessing"] if embedded is not None else Preprocessing()
    # The embedded record is the exact one when it agrees with what the HF files say.
    if embedded is not None and (preprocessor is None or preprocessor_json(embedded["preprocessing"]) == preprocessor):
        pre = embedded["preprocessing"]

    if embedded is not None:
        source, info = embedded["source"], embedded["info"]
    else:
        layout: dict[str, Any] = {"prefixed": prefixed, "weights_file": weights.name}
        if hf_config is not None:
            layout["hf_config"] = hf_config
        source = Source(format=NAME, file_name=path.name, digest=source_digest(path), layout=layout)
        info = {}
    ckpt = Checkpoint(config=config, tensors=tensors, preprocessing=pre, source=source, info=info)
    ckpt.validate(where)
    check_variant(config, variant, where)
    return ckpt


# ------------------------------------------------------------ writing

def hf_config_json(ckpt: Checkpoint) -> dict[str, Any]:
    """config.json faithful to the weights; fields of a foreign HF config we do not own are kept."""
    config = ckpt.config
    base: dict[str, Any] = {}
    if ckpt.source.format == NAME and isinstance(ckpt.source.layout.get("hf_config"), Mapping):
        base = dict(ckpt.source.layout["hf_config"])
    dtype = ckpt.dtype if ckpt.dtype in ("float32", "float16", "bfloat16") else "float32"
    data = dict(base)
    data.update({
        "architectures": [CLASSIFY_ARCH if config.num_classes else HEADLESS_ARCH],
        "depths": list(config.depths),
        "drop_path_rate": base.get("drop_path_rate", 0.0),
        "hidden_act": "gelu",
        "hidden_sizes": list(config.dims),
        "image_size": ckpt.preprocessing.input_size,
        "initializer_range": base.get("initializer_range", 0.02),
        # With no final norm in the checkpoint the placeholder norm is written with the original's eps.
        "layer_norm_eps": config.head_norm_eps,
        "model_type": "convnextv2",
        "num_channels": IN_CHANNELS,
        "num_stages": NUM_STAGES,
        "patch_size": PATCH_SIZE,
    })
    # transformers 4.56+ writes "dtype", older versions "torch_dtype"; keep whichever a source config used.
    data["dtype" if "dtype" in base else "torch_dtype"] = dtype
    if config.num_classes:
        labels = base.get("id2label")
        if not (isinstance(labels, Mapping) and len(labels) == config.num_classes):
            if config.num_classes == 1000:
                names = imagenet1k_labels()["descriptions"]
            else:
                names = [f"LABEL_{i}" for i in range(config.num_classes)]
            labels = {str(i): name for i, name in enumerate(names)}
        data["id2label"] = {str(k): v for k, v in labels.items()}
        # Duplicate class names (ImageNet has two "crane"s) keep the last index, as transformers does.
        data["label2id"] = {v: int(k) for k, v in data["id2label"].items()}
    else:
        data.pop("id2label", None)
        data.pop("label2id", None)
    return data


def canonical_to_state_dict(ckpt: Checkpoint) -> collections.OrderedDict[str, np.ndarray]:
    config = ckpt.config
    tensors = dict(ckpt.model_tensors())
    if not config.head_norm:
        # transformers' ConvNextV2Model always has the final norm; an FCMAE encoder has none. Write a unit
        # placeholder (weight 1, bias 0) so the model loads with no missing keys; it is recorded in the
        # embedded metadata and dropped again on reading.
        width = config.dims[-1]
        dtype = tensors["stem.conv.weight"].dtype
        tensors["head.norm.weight"] = np.ones(width, dtype=dtype)
        tensors["head.norm.bias"] = np.zeros(width, dtype=dtype)
    prefix = MODEL_PREFIX if config.num_classes else ""
    entries: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for name, array in tensors.items():
        mapped = KEYS.to_foreign(name)
        if mapped is None:
            raise BadInputError(f"tensor {name} has no place in the transformers layout")
        key, rule = mapped
        entries[key if rule is CLASSIFIER else prefix + key] = rule.transform.to_foreign(array)
    return entries


def write(ckpt: Checkpoint, path: Path, *, overwrite: bool = False) -> None:
    check_transformers_version()
    ckpt.validate(f"writing {path}")
    if ckpt.extras():
        warnings.warn(f"writing {path}: {len(ckpt.extras())} extras tensors (e.g. an FCMAE decoder) have no place "
                      "in a transformers model and are not written", UserWarning, stacklevel=2)
    if not ckpt.config.head_norm:
        warnings.warn(
            f"writing {path}: this encoder has no final LayerNorm but transformers' ConvNextV2Model always applies "
            "one; a unit placeholder (weight 1, bias 0) is written. last_hidden_state matches the encoder exactly; "
            "pooler_output is LayerNorm(mean) rather than the plain mean.",
            UserWarning, stacklevel=2,
        )
    if not _hf_represents(ckpt.preprocessing):
        warnings.warn(
            f"writing {path}: ConvNextImageProcessor cannot express this preprocessing "
            f"({ckpt.preprocessing.to_json_dict()}); preprocessor_config.json is the closest, and the exact one is "
            "kept in model.safetensors metadata", UserWarning, stacklevel=2,
        )
    state = canonical_to_state_dict(ckpt)
    metadata = {"format": "pt", **embedded_metadata(ckpt)}
    total = sum(int(a.size) * a.dtype.itemsize for a in state.values())
    with atomic_directory(path, overwrite) as tmp, byte_progress(total, f"writing {path.name}") as bar:
        write_safetensors(tmp / SAFE_WEIGHTS_FILE, list(state.items()), metadata, progress=bar)
        write_json(tmp / CONFIG_FILE, hf_config_json(ckpt))
        write_json(tmp / PREPROCESSOR_FILE, preprocessor_json(ckpt.preprocessing))
