"""The in-memory checkpoint every converter produces and consumes: config, canonical tensors, metadata."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convnextv2.converters.digests import LazySha256, deferring
from convnextv2.converters.strict_json import parse_json_text
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.variants import ModelConfig

# A released resolution in a file name: "_384_" / "_384." (facebookresearch), "-384px_" (mmpretrain).
_RESOLUTION_IN_NAME = re.compile(r"(?:^|[-_])(224|256|288|384|512)(?:px)?(?=[-_.]|$)")
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
    # Where these values came from: "read" (stated by the file), "assumed" (the file states nothing, so the
    # toolkit's default or a guess from the file name) or "set" (given by the user at conversion). Not part
    # of equality: the same numbers are the same preprocessing, however they were learned.
    origin: str = dataclasses.field(default="read", compare=False)

    @classmethod
    def for_resolution(cls, input_size: int) -> Preprocessing:
        # The released 384/512 checkpoints were fine-tuned without a crop: timm's pretrained configs
        # for them use crop_pct 1.0 and squash resizing.
        if input_size >= 384:
            return cls(input_size=input_size, crop_pct=1.0, crop_mode="squash")
        return cls(input_size=input_size)

    @classmethod
    def assumed_from_file_name(cls, file_name: str) -> Preprocessing:
        """What a file that states no preprocessing (a .pt / .pth state dict) implies: the resolution in its name
        (facebookresearch ``_384_``, mmpretrain ``-384px_``), else the toolkit's default; marked assumed."""
        match = _RESOLUTION_IN_NAME.search(file_name)
        return (cls.for_resolution(int(match.group(1))) if match else cls()).with_origin("assumed")

    def with_origin(self, origin: str) -> Preprocessing:
        if origin not in PREPROCESSING_ORIGINS:
            raise ValueError(f"preprocessing origin must be one of {PREPROCESSING_ORIGINS}, not {origin!r}")
        return dataclasses.replace(self, origin=origin)

    def to_json_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        # Files whose preprocessing was stated keep the metadata they always had; only a guess is marked.
        if self.origin == "read":
            del data["origin"]
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
                origin=_origin(data.get("origin", "read")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise BadInputError(f"preprocessing metadata is invalid: {exc!r}") from None


PREPROCESSING_ORIGINS = ("read", "assumed", "set")


def _origin(value: Any) -> str:
    if value not in PREPROCESSING_ORIGINS:
        raise ValueError(f"origin {value!r} is not one of {', '.join(PREPROCESSING_ORIGINS)}")
    return str(value)


@dataclasses.dataclass(eq=False)
class Source:
    """Where a checkpoint came from; carried through every conversion.

    ``digest`` is the source's sha256: a hex string, or a :class:`LazySha256` a reader recorded, which
    ``sha256`` resolves when first asked for (see ``converters.digests``).
    """

    format: str
    file_name: str = ""
    digest: str | LazySha256 = ""
    # Format-specific facts needed to write the same layout back bit for bit (e.g. GRN's stored shape).
    layout: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """The sha256 hex digest ("" when unknown). A pending digest is computed here, except inside
        ``deferred_digests()``, where it reads as its placeholder for ``write_safetensors`` to fill in."""
        value = self.digest
        if isinstance(value, LazySha256):
            if deferring() and not value.done:
                return value.placeholder
            value = self.digest = value.result()
        return value

    @sha256.setter
    def sha256(self, value: str) -> None:
        self.digest = value

    def pending_digest(self) -> LazySha256 | None:
        value = self.digest
        return value if isinstance(value, LazySha256) and not value.done else None

    def to_json_dict(self) -> dict[str, Any]:
        return {"format": self.format, "file_name": self.file_name, "sha256": self.sha256, "layout": self.layout}

    def __eq__(self, other: object) -> bool:
        # Two sources are equal when they record the same facts, whether or not a digest is still pending.
        if not isinstance(other, Source):
            return NotImplemented
        return self.to_json_dict() == other.to_json_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable, like any eq dataclass

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
            digest=str(data.get("sha256", "")),
            layout=dict(layout),
        )


@dataclasses.dataclass(eq=False)
class FileIdentity:
    """The file (or folder) a checkpoint was read from, as it is now: its own format and sha256, as opposed to
    ``Checkpoint.source``, the provenance a converted file records of what it was converted from.

    ``sha256`` is computed when first asked for: of a file, its bytes; of a folder (a transformers or timm
    folder), its regular files' bytes concatenated in sorted relative-path order (``converters.digests.sha256_of``).
    """

    format: str
    path: str
    digest: str | LazySha256 = ""

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def sha256(self) -> str:
        value = self.digest
        if isinstance(value, LazySha256):
            value = self.digest = value.result()
        elif not value:
            from convnextv2.converters.digests import sha256_of

            value = self.digest = sha256_of(self.path)
        return value

    def to_json_dict(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.path, "file_name": self.file_name, "sha256": self.sha256}


@dataclasses.dataclass
class Checkpoint:
    """Canonical tensors (numpy, possibly memory-mapped from the source file) plus everything about them."""

    config: ModelConfig
    tensors: dict[str, np.ndarray]
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    source: Source = dataclasses.field(default_factory=lambda: Source(format="memory"))
    # Plain-data leftovers of the source that are not tensors (epoch, training args), kept for the record.
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The file this checkpoint was read from (set by ``converters.load``); None for one built in memory.
    file: FileIdentity | None = dataclasses.field(default=None, compare=False, repr=False)
    # What reading that file left out, for the user (the wider model's tensors, a training run's optimizer
    # and logs); said by the commands, never stored.
    notes: list[str] = dataclasses.field(default_factory=list, compare=False, repr=False)

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
        """What ``convnextv2 inspect`` prints: the file's own format and sha256 (``file``), and apart from
        them where it came from (``source``)."""
        own = self.file.to_json_dict() if self.file is not None else None
        return {
            "format": own["format"] if own else self.source.format,
            "sha256": own["sha256"] if own else None,
            "file": own,
            "variant": self.config.variant,
            "depths": list(self.config.depths),
            "dims": list(self.config.dims),
            "num_classes": self.config.num_classes,
            "head_norm": self.config.head_norm,
            "head_norm_eps": self.config.head_norm_eps,
            "parameters": self.parameter_count,
            "dtype": self.dtype,
            "extras": len(self.extras()),
            "preprocessing": {**self.preprocessing.to_json_dict(), "origin": self.preprocessing.origin},
            "source": self.source.to_json_dict(),
            "info": self.info,
        }


def _dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def checkpoint_from_metadata(meta: Mapping[str, Any], tensors: dict[str, np.ndarray], where: str,
                             required: tuple[str, ...] = ("config", "preprocessing", "source")) -> Checkpoint:
    """Rebuild a Checkpoint from the canonical metadata fields (``Checkpoint.metadata()``), which every
    format that can carry them embeds; the one parser of those fields, so every reader refuses the same
    malformed values the same way. Values may be JSON text (safetensors, ONNX) or already-parsed JSON."""
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
