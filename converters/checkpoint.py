"""The in-memory checkpoint every converter produces and consumes: config, canonical tensors, metadata."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.reference.errors import BadInputError
from convnextv2.reference import schema
from convnextv2.reference.variants import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for this checkpoint (timm/HF pretrained-config semantics)."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # "center": resize shorter side to input_size / crop_pct, then centre-crop; "squash": resize both sides.
    crop_mode: str = "center"

    @classmethod
    def for_resolution(cls, input_size: int) -> Preprocessing:
        # The released 384/512 checkpoints were fine-tuned without a crop (facts §4.5).
        if input_size >= 384:
            return cls(input_size=input_size, crop_pct=1.0, crop_mode="squash")
        return cls(input_size=input_size)

    def to_json_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        if not isinstance(data, Mapping):
            raise BadInputError(f"preprocessing metadata must be a JSON object, found {type(data).__name__}")
        try:
            return cls(
                input_size=int(data["input_size"]),
                crop_pct=float(data["crop_pct"]),
                interpolation=str(data["interpolation"]),
                mean=tuple(float(x) for x in data["mean"]),  # type: ignore[arg-type]
                std=tuple(float(x) for x in data["std"]),  # type: ignore[arg-type]
                crop_mode=str(data.get("crop_mode", "center")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise BadInputError(f"preprocessing metadata is invalid: {exc!r}") from None


@dataclasses.dataclass
class Source:
    """Where a checkpoint came from; carried through every conversion."""

    format: str
    file_name: str = ""
    sha256: str = ""
    # Format-specific facts needed to write the same layout back bit for bit (e.g. GRN's stored shape).
    layout: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {"format": self.format, "file_name": self.file_name, "sha256": self.sha256, "layout": self.layout}

    def pending_digest(self) -> LazySha256 | None:
        value = self.__dict__.get("_sha256")
        return value if isinstance(value, LazySha256) and not value.done else None

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> Source:
        if not isinstance(data, Mapping):
            raise BadInputError(f"source metadata must be a JSON object, found {type(data).__name__}")
        layout = data.get("layout", {})
        if not isinstance(layout, Mapping):
            raise BadInputError(f"source metadata 'layout' must be a JSON object, found {type(layout).__name__}")
        return cls(
            format=str(data.get("format", "unknown")),
            file_name=str(data.get("file_name", "")),
            sha256=str(data.get("sha256", "")),
            layout=dict(layout),
        )


def _source_sha256(self: Source) -> str:
    value = self.__dict__.get("_sha256", "")
    if isinstance(value, LazySha256):
        if _DEFERRAL.active and not value.done:
            return value.placeholder
        value = self.__dict__["_sha256"] = value.result()
    return value


def _set_source_sha256(self: Source, value: str | LazySha256) -> None:
    self.__dict__["_sha256"] = value


# The digest of a multi-GB source costs a full read of it: a reader records a LazySha256, which is computed
# when first asked for, or by a writer while it streams the tensors (the two reads then share one pass through
# the page cache and run on two cores).
Source.sha256 = property(_source_sha256, _set_source_sha256)  # type: ignore[assignment,method-assign]


@dataclasses.dataclass
class Checkpoint:
    """Canonical tensors (numpy, possibly memory-mapped from the source file) plus everything about them."""

    config: ModelConfig
    tensors: dict[str, np.ndarray]
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    source: Source = dataclasses.field(default_factory=lambda: Source(format="memory"))
    # Plain-data leftovers of the source that are not tensors (epoch, training args), kept for the record.
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self, where: str = "checkpoint") -> None:
        schema.validate({k: v.shape for k, v in self.tensors.items()}, self.config, where)

    def model_tensors(self) -> dict[str, np.ndarray]:
        """The canonical tensors in forward order, without extras."""
        return {name: self.tensors[name] for name in schema.expected_shapes(self.config)}

    def extras(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.tensors.items() if k.startswith(schema.EXTRAS_PREFIX)}

    def ordered_tensors(self) -> list[tuple[str, np.ndarray]]:
        """Model tensors in forward order, then extras sorted by name: the order files are written in."""
        items = list(self.model_tensors().items())
        items += sorted(self.extras().items())
        return items

    @property
    def parameter_count(self) -> int:
        return int(sum(v.size for v in self.model_tensors().values()))

    @property
    def dtype(self) -> str:
        kinds = sorted({str(v.dtype) for v in self.model_tensors().values()})
        return kinds[0] if len(kinds) == 1 else "mixed(" + ",".join(kinds) + ")"

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` of a canonical file (string values; JSON where structured)."""
        return {
            "format": "pt",  # lets transformers and others treat the file as PyTorch-layout safetensors
            "schema": schema.SCHEMA_NAME,
            "schema_version": schema.SCHEMA_VERSION,
            "config": _dumps(self.config.to_json_dict()),
            "preprocessing": _dumps(self.preprocessing.to_json_dict()),
            "source": _dumps(self.source.to_json_dict()),
            "info": _dumps(self.info),
        }

    def describe(self) -> dict[str, Any]:
        """What ``convnextv2 inspect`` prints."""
        return {
            "format": self.source.format,
            "variant": self.config.variant,
            "depths": list(self.config.depths),
            "dims": list(self.config.dims),
            "num_classes": self.config.num_classes,
            "head_norm": self.config.head_norm,
            "head_norm_eps": self.config.head_norm_eps,
            "parameters": self.parameter_count,
            "dtype": self.dtype,
            "extras": len(self.extras()),
            "preprocessing": self.preprocessing.to_json_dict(),
            "source": self.source.to_json_dict(),
            "info": self.info,
        }


def _dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def sha256_of(path: str | os.PathLike[str], chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


class LazySha256:
    """sha256 of a file, computed on first use or in the background while a writer streams the tensors.

    The file's identity (device, inode, size, mtime) is recorded when the checkpoint is read; a file replaced
    or modified before the digest is computed is refused rather than hashed.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        stat = self.path.stat()
        self.identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        self.placeholder = f"sha256-pending-{id(self):x}".ljust(64, "0")[:64]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._value: str | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._value is not None

    def _compute(self) -> None:
        try:
            digest = hashlib.sha256()
            with open(self.path, "rb", buffering=0) as handle:
                stat = os.fstat(handle.fileno())
                if (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns) != self.identity:
                    raise BadInputError(f"{self.path} changed while it was being converted")
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                buffer = bytearray(HASH_CHUNK)
                view = memoryview(buffer)
                while count := handle.readinto(buffer):
                    digest.update(view[:count])
            self._value = digest.hexdigest()
        except BaseException as exc:  # handed to whoever asks for the value
            self._error = exc

    def start(self) -> None:
        """Begin hashing on a background thread (hashlib and file reads release the GIL)."""
        with self._lock:
            if self._thread is None and self._value is None:
                self._thread = threading.Thread(target=self._compute, name=f"sha256 {self.path.name}", daemon=True)
                self._thread.start()

    def result(self) -> str:
        with self._lock:
            thread = self._thread
            if thread is None and self._value is None and self._error is None:
                self._compute()
        if thread is not None:
            thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


HASH_CHUNK = 8 * 1024 * 1024
# Weak: a checkpoint that is dropped takes its pending digest with it.
_PLACEHOLDERS: weakref.WeakValueDictionary[str, LazySha256] = weakref.WeakValueDictionary()
_PLACEHOLDERS_LOCK = threading.Lock()


class _Deferral(threading.local):
    active = False


_DEFERRAL = _Deferral()


@contextlib.contextmanager
def deferred_digests() -> Iterator[None]:
    """Inside, a source digest not computed yet reads as a 64-character placeholder (the length of the real
    one) instead of blocking; ``write_safetensors`` starts those digests, streams the tensors meanwhile and
    writes the real values into its header last. Use it only around metadata handed to that writer."""
    previous = _DEFERRAL.active
    _DEFERRAL.active = True
    try:
        yield
    finally:
        _DEFERRAL.active = previous


def register_placeholder(digest: LazySha256) -> None:
    with _PLACEHOLDERS_LOCK:
        _PLACEHOLDERS[digest.placeholder] = digest


def pending_placeholders(text: bytes) -> list[LazySha256]:
    """The lazy digests whose placeholders appear in ``text`` (a header about to be written)."""
    with _PLACEHOLDERS_LOCK:
        candidates = list(_PLACEHOLDERS.values())
    return [d for d in candidates if d.placeholder.encode() in text]


def lazy_sha256(path: str | os.PathLike[str]) -> LazySha256:
    digest = LazySha256(path)
    register_placeholder(digest)
    return digest


def checkpoint_from_metadata(meta: Mapping[str, Any], tensors: dict[str, np.ndarray], where: str,
                             required: tuple[str, ...] = ("config", "preprocessing", "source")) -> Checkpoint:
    """Rebuild a Checkpoint from the canonical metadata fields (``Checkpoint.metadata()``), which every
    format that can carry them embeds; the one parser of those fields, so every reader refuses the same
    malformed values the same way. Values may be JSON text (safetensors, ONNX) or already-parsed JSON."""
    from convnextv2.converters.safetensors_io import parse_json_text

    version = meta.get("schema_version")
    if version not in schema.SUPPORTED_SCHEMA_VERSIONS:
        raise BadInputError(
            f"{where}: schema version {version!r} is not supported by this toolkit "
            f"(supports {', '.join(schema.SUPPORTED_SCHEMA_VERSIONS)}); upgrade convnextv2"
        )

    def field(key: str) -> Any:
        if key not in meta:
            if key in required:
                raise BadInputError(f"{where}: the toolkit metadata lacks {key!r}")
            return {}
        value = meta[key]
        return parse_json_text(value, f"{where}: metadata {key!r}") if isinstance(value, (str, bytes)) else value

    def parsed(key: str, build: Any) -> Any:
        try:
            return build(field(key))
        except BadInputError as exc:
            text = str(exc)
            raise BadInputError(text if text.startswith(where) else f"{where}: {text}") from None

    info = field("info")
    if not isinstance(info, Mapping):
        raise BadInputError(f"{where}: metadata 'info' must be a JSON object, found {type(info).__name__}")
    ckpt = Checkpoint(
        config=parsed("config", ModelConfig.from_json_dict),
        tensors=tensors,
        preprocessing=parsed("preprocessing", Preprocessing.from_json_dict),
        source=parsed("source", Source.from_json_dict),
        info=dict(info),
    )
    return ckpt
