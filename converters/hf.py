"""Hugging Face transformers ConvNeXt V2, in and out.

Written: a directory ``transformers.ConvNextV2ForImageClassification.from_pretrained`` (``ConvNextV2Model``
when headless) loads with no missing or unexpected keys: ``config.json``, ``model.safetensors`` (metadata
``format: pt``, which the TF classes need for ``from_pt=True``) and ``preprocessor_config.json``.

Read: such directories (one weights file or shards behind an index), and bare HF state dicts (safetensors,
or ``pytorch_model.bin`` through the safe reader), with or without the ``convnextv2.`` prefix of the
classification model; the Hub's old GRN names (``grn.gamma``/``grn.beta``) are read as ``grn.weight``/``bias``.
A huggingface_hub cache folder (``models--ORG--NAME``) is read at ``refs/main`` or the revision asked for.
Without ``preprocessor_config.json`` the preprocessing is assumed (from ``image_size``, or from a resolution
in the repository name, which the Hub's 384/512 checkpoints need: their config.json says 224) and says so.

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
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint, Preprocessing, Source
from convnextv2.converters.digests import source_digest
from convnextv2.converters.format_contract import Format, Naming
from convnextv2.converters.format_limits import Change, dropped_extras
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
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError, UnplacedKeysError
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
PREPROCESSOR_FILE = "preprocessor_config.json"
MODEL_PREFIX = "convnextv2."
# transformers' ConvNeXt V1 (ConvNextModel, ConvNextForImageClassification): its folders are claimed so that they
# are refused as V1 (converters.families), not as an unknown format; its classifier's base keys carry "convnext.".
V1_MODEL_TYPE = "convnext"
V1_MODEL_PREFIX = "convnext."
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
# The key every transformers ConvNeXt state dict has (first block's depthwise weight): where it sits tells the
# prefix, for telling which naming an unreadable file is closest to (converters.families).
ANCHORS = ("encoder.stages.0.layers.0.dwconv.weight",)


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

def _model_type(path: Path) -> Any:
    try:
        return load_json(path).get("model_type")
    except BadInputError:
        return None


def _is_hf_config(path: Path) -> bool:
    return _model_type(path) == "convnextv2"


def _weights_file(directory: Path) -> Path | None:
    for name in (SAFE_WEIGHTS_FILE, BIN_WEIGHTS_FILE, *SHARD_INDEX_FILES):
        if (directory / name).is_file():
            return directory / name
    return None


def _looks_hf(keys: list[str]) -> bool:
    stem = "embeddings.patch_embeddings.weight"
    return any(prefix + stem in keys for prefix in ("", MODEL_PREFIX, V1_MODEL_PREFIX))


def sniff(path: Path) -> bool:
    if path.is_dir():
        folder = sniff_hub_folder(path)
        return folder is not None and (folder / CONFIG_FILE).is_file() \
            and _model_type(folder / CONFIG_FILE) in ("convnextv2", V1_MODEL_TYPE) and _weights_file(folder) is not None
    return path.is_file() and _looks_hf(peek_keys(path))


# ------------------------------------------------------------ reading

# The first Hub uploads named GRN's parameters gamma/beta; transformers' conversion script renames them
# weight/bias (transformers itself does not, and loads such a folder with GRN freshly initialised).
LEGACY_GRN_NAMES = {".grn.gamma": ".grn.weight", ".grn.beta": ".grn.bias"}


def _rename_legacy_grn(state: Mapping[str, np.ndarray], where: str) -> tuple[Mapping[str, np.ndarray], int]:
    renamed: dict[str, np.ndarray] = {}
    count = 0
    for key, array in state.items():
        new = key
        for old_suffix, new_suffix in LEGACY_GRN_NAMES.items():
            if key.endswith(old_suffix):
                new = key[: -len(old_suffix)] + new_suffix
        if new != key:
            if new in state:
                raise BadInputError(f"{where}: both {key} and {new} are present; which one is GRN's is ambiguous")
            count += 1
        renamed[new] = array
    if count:
        warnings.warn(
            f"{where}: {count} GRN tensors use the old names grn.gamma/grn.beta; read as grn.weight/grn.bias, as "
            "transformers' conversion script maps them", UserWarning, stacklevel=3,
        )
    return (renamed if count else state), count


def state_dict_to_canonical(state: Mapping[str, np.ndarray], where: str) -> tuple[dict[str, np.ndarray], bool]:
    """HF keys -> canonical tensors; returns (tensors, whether the base keys had the ``convnextv2.`` prefix).
    Old GRN names are renamed before (``_rename_legacy_grn``)."""
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
            unknown.append(key)
            continue
        name, rule = mapped
        tensors[name] = rule.transform.to_canonical(array, f"{where}: {key}")
    if unknown:
        raise UnplacedKeysError.in_state(where, NAME, state, unknown, "transformers' ConvNeXt V2 naming")
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


# A resolution in a repository or folder name ("convnextv2-tiny-22k-384"): a separate run of digits.
_NAMED_RESOLUTION = re.compile(r"(?:^|[-_/.])(\d{3,4})(?=$|[-_/.])")


def resolution_in_name(name: str) -> int | None:
    """The input size a checkpoint's name states, if any (multiples of 32 from 128 to 1024 px)."""
    for match in reversed(_NAMED_RESOLUTION.findall(name)):
        size = int(match)
        if 128 <= size <= 1024 and size % 32 == 0:
            return size
    return None


def assumed_preprocessing(hf_config: Mapping[str, Any] | None, name: str, where: str) -> Preprocessing:
    """A folder without preprocessor_config.json: ConvNextImageProcessor's behaviour at config.json's
    ``image_size``, unless the name states another resolution (the Hub's 384 and 512 checkpoints carry
    image_size 224), marked assumed and said in a note."""
    stated = 224 if hf_config is None else _config_number(hf_config, "image_size", 224, int, where)
    named = resolution_in_name(name)
    size = named if named is not None else stated
    pre = Preprocessing.for_resolution(size).with_origin("assumed")
    because = (f"the name {name!r} says {named}px; config.json's image_size is {stated}" if named not in (None, stated)
               else "config.json's image_size" if hf_config is not None and "image_size" in hf_config
               else "ConvNextImageProcessor's defaults")
    warnings.warn(
        f"{where}: no {PREPROCESSOR_FILE}; preprocessing assumed: {pre.input_size}px, crop_pct {pre.crop_pct:g} "
        f"({pre.crop_mode}), {pre.interpolation} ({because})", UserWarning, stacklevel=3,
    )
    return pre


def _warn_eps(eps: float, where: str) -> None:
    if eps != LAYER_NORM_EPS:
        warnings.warn(
            f"{where}: the final LayerNorm uses eps {eps:g} (transformers' layer_norm_eps); the original ConvNeXt V2 "
            f"uses {LAYER_NORM_EPS:g}. Formats that can hold it keep it; a conversion to one that cannot (the "
            "original and FCMAE layouts) warns with the change it makes.",
            UserWarning, stacklevel=3,
        )


def read(path: Path, *, variant: str | None = None, revision: str | None = None) -> Checkpoint:
    """``revision``: a branch, tag or commit of a huggingface_hub cache folder (default: main)."""
    check_transformers_version()
    where = str(path)
    hf_config: dict[str, Any] | None = None
    preprocessor: dict[str, Any] | None = None
    folder: HubFolder = hub_folder(path, revision)
    if folder.directory != path:
        where = f"{path} (revision {folder.revision}: snapshot {folder.commit})"
    directory = folder.directory if path.is_dir() else path.parent
    if path.is_dir():
        weights = _weights_file(directory)
        if weights is None:
            raise BadInputError(f"{where}: no {SAFE_WEIGHTS_FILE}, {BIN_WEIGHTS_FILE} or shard index in the directory")
        if not (directory / CONFIG_FILE).is_file():
            raise BadInputError(f"{where}: no {CONFIG_FILE} in the directory")
    else:
        weights = path
    # A bare state dict may sit beside its config (a file inside a model directory).
    if (directory / CONFIG_FILE).is_file() and (path.is_dir() or _is_hf_config(directory / CONFIG_FILE)):
        hf_config = load_json(directory / CONFIG_FILE)
    if (directory / PREPROCESSOR_FILE).is_file() and hf_config is not None:
        preprocessor = load_json(directory / PREPROCESSOR_FILE)

    stored = read_weights(weights)
    state, meta = stored.state, stored.metadata
    if path.is_dir() and _model_type(directory / CONFIG_FILE) == V1_MODEL_TYPE:
        # Refused as ConvNeXt V1 by converters.load, with the key that shows it (families.explain); nothing
        # unplaced is listed, so where the weights show no V1 sign the config's word stands.
        raise UnplacedKeysError(where, NAME, {k: tuple(v.shape) for k, v in state.items()}, [],
                                f"{where}: {CONFIG_FILE} says model_type {V1_MODEL_TYPE!r} (ConvNeXt V1); this "
                                "toolkit reads ConvNeXt V2 only")
    state, legacy_grn = _rename_legacy_grn(state, str(weights))
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

    # The embedded record is the exact one when it agrees with what the HF files say.
    if embedded is not None and (preprocessor is None or preprocessor_json(embedded["preprocessing"]) == preprocessor):
        pre = embedded["preprocessing"]
    elif preprocessor is not None:
        pre = preprocessing_from_hf(preprocessor, str(directory / PREPROCESSOR_FILE))
    else:
        # A folder is named by its repository (or itself); a bare state dict by its own file name.
        name = folder.name if path.is_dir() else directory.name if hf_config is not None else path.stem
        pre = assumed_preprocessing(hf_config, name, where)

    if embedded is not None:
        source, info = embedded["source"], embedded["info"]
    else:
        layout: dict[str, Any] = {"prefixed": prefixed, "weights_file": weights.name, **folder.layout()}
        if legacy_grn:
            layout["legacy_grn_names"] = True
        if hf_config is not None:
            layout["hf_config"] = hf_config
        digest = source_digest(folder.directory if path.is_dir() else path)
        source = Source(format=NAME, file_name=path.name, digest=digest, layout=layout)
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
    return collections.OrderedDict(
        (key if rule is CLASSIFIER else prefix + key, array)
        for key, rule, array in KEYS.to_foreign_tensors(tensors, "the transformers layout"))


def unrepresentable(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    # config.json's layer_norm_eps holds the final norm's eps and preprocessor_config.json the preprocessing;
    # only the extras have no place.
    return dropped_extras(ckpt, "a transformers model")


def output_bytes(ckpt: Checkpoint, options: Mapping[str, Any]) -> int:
    """The weights file's tensors: the model's, and the unit final norm a headless encoder is given."""
    placeholder = 0 if ckpt.config.head_norm else 2 * ckpt.config.dims[-1] * ckpt.tensors["stem.conv.weight"].dtype.itemsize
    return sum(int(a.size) * a.dtype.itemsize for a in ckpt.model_tensors().values()) + placeholder


def write(ckpt: Checkpoint, path: Path) -> None:
    """The transformers folder at ``path`` (made if absent; converters.save makes it atomic). The extras a
    transformers model has no place for (``unrepresentable``, announced by converters.save) are not written."""
    check_transformers_version()
    ckpt.validate(f"writing {path}")
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
    path.mkdir(exist_ok=True)
    with byte_progress(total, f"writing {path.name}") as bar:
        write_safetensors(path / SAFE_WEIGHTS_FILE, list(state.items()), metadata, progress=bar)
        write_json(path / CONFIG_FILE, hf_config_json(ckpt))
        write_json(path / PREPROCESSOR_FILE, preprocessor_json(ckpt.preprocessing))


FORMAT = Format(NAME, sniff, read, write, unrepresentable=unrepresentable, runner="transformers-pt",
                output_bytes=output_bytes, naming=Naming(ANCHORS, (KEYS,)))
