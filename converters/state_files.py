"""A bare state dict on disk, as transformers and timm save one: a safetensors file or a torch zip, alone or
sharded behind an index; and the folders Hugging Face tools keep them in, huggingface_hub's cache included.

Read through our own validating readers (no ``torch``, no pickled code run); ``peek_keys`` lets sniffers
look at the tensor names without touching tensor data.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.inert import inert_globals, is_inert
from convnextv2.converters.safetensors_io import is_safetensors, read_safetensors, sniff_header
from convnextv2.converters.strict_json import load_json
from convnextv2.converters.torchzip import is_torch_zip, read_torch_zip
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError, UnsafeCheckpointError

# ------------------------------------------------------------ the weights inside a checkpoint's container

# Where training code puts the weights: facebookresearch and DeiT-style scripts under "model" (and the EMA copy
# under "model_ema"), mmengine, Lightning and open_clip under "state_dict", DeepSpeed under "module".
WEIGHT_ENTRIES = ("model", "state_dict", "module")
EMA_ENTRY = "model_ema"


@dataclasses.dataclass
class Weights:
    """The state dict found in a loaded checkpoint and what surrounded it.

    ``container``: "bare" or the entry the weights came from. ``kept``: the entries a format asked to keep
    (plain data, as the file has them). ``skipped``: every other entry, with the placeholders it holds by
    the global the file named (torchzip.Inert: read, never constructed)."""

    state: dict[str, np.ndarray]
    container: str
    kept: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def skipped_note(self) -> str | None:
        return "skipped: " + skipped_text(self.skipped) if self.skipped else None


def skipped_text(skipped: Mapping[str, Mapping[str, int]]) -> str:
    """``message_hub (mmengine.logging.history_buffer.HistoryBuffer x1), optimizer``."""
    parts = []
    for entry, held in skipped.items():
        inert = ", ".join(f"{name} x{count}" for name, count in held.items())
        parts.append(f"{entry} ({inert})" if inert else entry)
    return ", ".join(parts)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


def _refuse_inert(value: Any, where: str, what: str) -> None:
    if is_inert(value):
        raise UnsafeCheckpointError(
            f"{where}: {what} is a pickled {value.pickled_global}, not a checkpoint; refusing pickled global "
            f"{value.pickled_global}: nothing of it was constructed or run")


def _check_tensors(state: Mapping[Any, Any], where: str, entry: str) -> dict[str, np.ndarray]:
    for key, value in state.items():
        _refuse_inert(value, where, f"{entry!r} entry {key!r}")
    bad = [str(k) for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise BadInputError(f"{where}: {entry!r} holds non-tensor entries {bad[:5]}")
    return {str(k): v for k, v in state.items()}


def select_weights(obj: Any, where: str, *, ema: bool = False, keep: tuple[str, ...] = (),
                   entries: tuple[str, ...] = WEIGHT_ENTRIES) -> Weights:
    """The weights in a loaded checkpoint: a bare state dict, or the first of ``entries`` the file has
    (``ema``: ``model_ema``). Nothing beside them is interpreted: ``keep`` names the entries returned as they
    are, every other one is reported as skipped."""
    _refuse_inert(obj, where, "the file's object")
    if _is_state_dict(obj):
        if ema:
            raise BadInputError(f"{where}: --ema asked for {EMA_ENTRY}, but the file is a bare state dict")
        return Weights({str(k): v for k, v in obj.items()}, "bare")
    if not isinstance(obj, Mapping):
        raise BadInputError(f"{where}: expected a dict checkpoint, found {type(obj).__name__}")
    wanted = (EMA_ENTRY,) if ema else entries
    found = next((name for name in wanted if name in obj), None)
    if found is None:
        hint = " (the file has 'model'; drop --ema)" if ema and "model" in obj else ""
        expected = " or ".join(repr(name) for name in wanted)
        raise BadInputError(f"{where}: no {expected} entry holding the weights; top-level keys are "
                            f"{sorted(map(str, obj))[:10]}{hint}")
    state = obj[found]
    _refuse_inert(state, where, f"{found!r}")
    if not isinstance(state, Mapping):
        raise BadInputError(f"{where}: {found!r} is a {type(state).__name__}, not a state dict")
    weights = Weights(_check_tensors(state, where, found), found)
    for name, value in obj.items():
        if name == found:
            continue
        if name in keep:
            weights.kept[str(name)] = value
        else:
            weights.skipped[str(name)] = dict(sorted(inert_globals(value).items()))
    return weights


def plain_data(value: Any) -> Any:
    """A JSON-safe copy of pickled plain data kept beside the weights (training args, mmengine's meta): tuples become lists, tensors and objects this
    reader did not construct become a short description."""
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain_data(v) for v in value), key=repr)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, np.ndarray):
        return f"<tensor {list(value.shape)} {value.dtype}>"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN or infinity
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)  # a placeholder (converters/inert.py) says which class the file named


@dataclasses.dataclass
class StoredWeights:
    """What a weights file held: the tensors, its safetensors metadata (empty for a torch zip) and the entries
    skipped beside the weights of a torch-zip container (``Weights.skipped``)."""

    state: dict[str, np.ndarray]
    metadata: dict[str, str]
    skipped: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)


def read_state_file(path: Path, where: str) -> StoredWeights:
    """A safetensors file or a torch-zip state dict (safe reader)."""
    if is_safetensors(path):
        return StoredWeights(*read_safetensors(path))
    if is_torch_zip(path):
        weights = select_weights(read_torch_zip(path), where)
        return StoredWeights(weights.state, {}, weights.skipped)
    raise BadInputError(f"{where}: not a safetensors file or a torch zip state dict")


def peek_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file or torch zip without touching tensor data; [] when unreadable."""
    try:
        found = sniff_header(path)
        if found is not None:
            header, meta = found
            if meta.get("schema") == schema.SCHEMA_NAME:
                return []  # a canonical file
            return [k for k in header if k != "__metadata__"]
        if is_torch_zip(path):
            return list(select_weights(read_torch_zip(path), str(path)).state)
    except Exception:  # a sniffer must answer, never raise
        return []
    return []



# ------------------------------------------------------------ sharded weights

# save_pretrained (and timm's hub tooling) shard large models into files listed by one of these indexes.
SHARD_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_weights(weights: Path) -> StoredWeights:
    """One weights file, or every shard an index lists, merged (metadata from the first shard). A shard must
    sit beside its index, and every tensor the index lists must be in the shards."""
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
        shard_weights = read_state_file(shard_path, str(shard_path))
        twice = sorted(set(shard_weights.state) & set(state))
        if twice:
            raise BadInputError(f"{weights}: tensor(s) {twice[:5]} are in more than one shard")
        meta = meta or shard_weights.metadata
        state.update(shard_weights.state)
    missing = sorted(set(map(str, weight_map)) - set(state))
    if missing:
        raise BadInputError(f"{weights}: {len(missing)} tensor(s) listed in the index are in no shard: {missing[:5]}")
    return StoredWeights(state, meta)


# ------------------------------------------------------------ huggingface_hub cache folders

# huggingface_hub's cache keeps one folder per repository, ``models--ORG--NAME``, holding ``refs/<revision>``
# (a file with the commit hash a branch or tag points at), ``snapshots/<commit>/`` (the repository's files,
# usually relative symlinks into ``blobs/``) and ``blobs/``.
CACHE_PREFIX = "models--"
DEFAULT_REVISION = "main"


@dataclasses.dataclass(frozen=True)
class HubFolder:
    """The folder whose files are read, and what is known of the repository it belongs to."""

    directory: Path
    # "ORG/NAME" when the folder sits in a huggingface_hub cache, else None.
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    @property
    def name(self) -> str:
        """What the checkpoint is called: the repository id in a cache, else the folder's own name."""
        return self.repo_id or self.directory.name

    def layout(self) -> dict[str, Any]:
        if self.repo_id is None:
            return {}
        return {"hub_cache": {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}}


def is_hub_cache(path: Path) -> bool:
    """A huggingface_hub cache folder of one repository, given at its root."""
    return path.is_dir() and (path / "snapshots").is_dir() and ((path / "refs").is_dir() or (path / "blobs").is_dir())


def _repo_id(cache: Path) -> str | None:
    name = cache.name
    if not name.startswith(CACHE_PREFIX):
        return None
    return name[len(CACHE_PREFIX):].replace("--", "/")


def _refs(cache: Path) -> dict[str, Path]:
    refs = cache / "refs"
    if not refs.is_dir():
        return {}
    return {p.relative_to(refs).as_posix(): p for p in sorted(refs.rglob("*")) if p.is_file()}


def _snapshots(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "snapshots").iterdir() if p.is_dir())


def _found(cache: Path) -> str:
    refs = [f"{name} -> {_read_ref(path)}" for name, path in _refs(cache).items()]
    snapshots = _snapshots(cache)
    return (f"refs: {', '.join(refs) or 'none'}; snapshots: {', '.join(snapshots) or 'none'}")


def _read_ref(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()[:80]
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc})") from None


def _check_revision_name(revision: str, cache: Path) -> None:
    # A revision names a file under refs/ or a folder under snapshots/; it must not walk out of them.
    parts = revision.replace("\\", "/").split("/")
    if not revision or revision.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise BadInputError(f"{cache}: revision {revision!r} is not a branch, tag or commit name")


def _check_links_stay_inside(snapshot: Path, cache: Path) -> None:
    """Every file of the snapshot must resolve inside the cache folder: a symlink out of it could make us
    read (and report on) an arbitrary file of the machine."""
    root = os.path.realpath(cache)
    for entry in sorted(snapshot.rglob("*")):
        target = os.path.realpath(entry)
        if os.path.commonpath([root, target]) != root:
            raise BadInputError(
                f"{entry}: symlink points outside the cache folder {cache} (to {target}); refusing to follow it")


def resolve_hub_cache(cache: Path, revision: str | None) -> HubFolder:
    """The snapshot a revision names in a huggingface_hub cache folder, as huggingface_hub resolves it:
    a branch or tag through ``refs/<revision>``, else a commit hash naming a snapshot."""
    asked = revision or DEFAULT_REVISION
    _check_revision_name(asked, cache)
    refs = _refs(cache)
    commit = _read_ref(refs[asked]) if asked in refs else asked
    snapshots = _snapshots(cache)
    if commit not in snapshots:
        if asked in refs:
            raise BadInputError(f"{cache}: refs/{asked} points at commit {commit!r}, which has no snapshot "
                                f"in the cache ({_found(cache)})")
        raise BadInputError(f"{cache}: revision {asked!r} is neither in refs/ nor a snapshot ({_found(cache)}); "
                            "pass --revision with one of them")
    snapshot = cache / "snapshots" / commit
    _check_links_stay_inside(snapshot, cache)
    return HubFolder(directory=snapshot, repo_id=_repo_id(cache), revision=asked, commit=commit)


def hub_folder(path: Path, revision: str | None = None) -> HubFolder:
    """The folder to read for ``path``: a cache root resolves to one of its snapshots; a snapshot inside a
    cache is checked like one; any other folder is itself, and takes no revision."""
    if is_hub_cache(path):
        return resolve_hub_cache(path, revision)
    parent = path.parent
    if path.is_dir() and parent.name == "snapshots" and is_hub_cache(parent.parent):
        cache = parent.parent
        if revision is not None and revision != path.name:
            raise BadInputError(f"{path}: this is snapshot {path.name} of a cache folder; --revision {revision!r} "
                                f"names another one (give the cache folder {cache} itself)")
        _check_links_stay_inside(path, cache)
        refs = [name for name, ref in _refs(cache).items() if _read_ref(ref) == path.name]
        return HubFolder(directory=path, repo_id=_repo_id(cache), revision=refs[0] if refs else path.name,
                         commit=path.name)
    if revision is not None:
        raise BadInputError(f"{path}: --revision applies to a huggingface_hub cache folder (models--ORG--NAME, "
                            "with refs/ and snapshots/); this is not one")
    return HubFolder(directory=path)


def sniff_hub_folder(path: Path) -> Path | None:
    """The folder a sniffer should look at: a cache root's default snapshot (or, when refs/main is missing or
    broken, its newest-named one, so that reading then explains what is wrong); None when none exists."""
    if not is_hub_cache(path):
        return path
    try:
        return resolve_hub_cache(path, None).directory
    except BadInputError:
        snapshots = _snapshots(path)
        return path / "snapshots" / snapshots[-1] if snapshots else None
