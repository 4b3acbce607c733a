"""ConvNeXt V2 sizes and the model configuration every framework builds from.

Variant strings are decoded here and nowhere else: ``"tiny"``, ``"convnextv2_tiny"``,
``"custom:depths=2,2,6,2;dims=40,80,160,320"``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from convnextv2.reference.errors import BadInputError

# name -> (depths, dims); the eight released sizes.
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}

# Multiply-accumulates at 224x224 with a 1000-class head, in GMACs (as published); used by benchmarks.
GMACS_224: dict[str, float] = {
    "atto": 0.547, "femto": 0.780, "pico": 1.367, "nano": 2.446,
    "tiny": 4.456, "base": 15.36, "large": 34.36, "huge": 114.9,
}

# Every norm in ConvNeXt V2 uses this eps; only the final pooled norm may differ (HF default 1e-12).
LAYER_NORM_EPS = 1e-6
GRN_EPS = 1e-6
NUM_STAGES = 4
IN_CHANNELS = 3
MLP_RATIO = 4
# Far beyond any real model (the largest stage has 27 blocks, the widest 2816 channels), but small enough
# that a hostile config cannot make the schema enumerate a billion tensors before anything is checked.
MAX_DEPTH = 1024
MAX_WIDTH = 1 << 16
MAX_CLASSES = 1 << 20


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes tensor shapes and numerics of one ConvNeXt V2 model."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    num_classes: int = 1000
    # Headless encoders from FCMAE have no final norm; HF's headless model keeps it.
    head_norm: bool = True
    head_norm_eps: float = LAYER_NORM_EPS

    def __post_init__(self) -> None:
        if len(self.depths) != NUM_STAGES or len(self.dims) != NUM_STAGES:
            raise BadInputError(
                f"ConvNeXt V2 has {NUM_STAGES} stages: got depths={list(self.depths)}, dims={list(self.dims)}"
            )
        if any(d < 1 for d in self.depths) or any(c < 1 for c in self.dims):
            raise BadInputError(f"depths and dims must be positive: {list(self.depths)}, {list(self.dims)}")
        if any(d > MAX_DEPTH for d in self.depths) or any(c > MAX_WIDTH for c in self.dims):
            raise BadInputError(
                f"depths {list(self.depths)} / dims {list(self.dims)} exceed the limits "
                f"(depth <= {MAX_DEPTH}, width <= {MAX_WIDTH}); this is not a ConvNeXt V2 checkpoint"
            )
        if not 0 <= self.num_classes <= MAX_CLASSES:
            raise BadInputError(f"num_classes must be in 0..{MAX_CLASSES}, got {self.num_classes}")
        if self.num_classes > 0 and not self.head_norm:
            raise BadInputError("a classification head needs the final norm (head_norm=True)")

    @property
    def variant(self) -> str:
        """Released size name, or ``custom`` for any other depths/dims."""
        for name, (depths, dims) in VARIANTS.items():
            if depths == tuple(self.depths) and dims == tuple(self.dims):
                return name
        return "custom"

    def with_(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "depths": list(self.depths),
            "dims": list(self.dims),
            "num_classes": self.num_classes,
            "head_norm": self.head_norm,
            "head_norm_eps": self.head_norm_eps,
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        if not isinstance(data, Mapping):
            raise BadInputError(f"model config must be a JSON object, found {type(data).__name__}")
        try:
            return cls(
                depths=tuple(int(d) for d in data["depths"]),
                dims=tuple(int(c) for c in data["dims"]),
                num_classes=int(data["num_classes"]),
                head_norm=bool(data.get("head_norm", True)),
                head_norm_eps=float(data.get("head_norm_eps", LAYER_NORM_EPS)),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            shown = json.dumps(dict(data), default=str)[:300]
            raise BadInputError(f"model config {shown} is invalid: {exc!r}") from None


def parse_variant(spec: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Decode a variant string into (depths, dims)."""
    text = spec.strip().lower()
    if text.startswith("convnextv2_"):
        text = text[len("convnextv2_"):]
    if text in VARIANTS:
        return VARIANTS[text]
    if text.startswith("custom:"):
        fields: dict[str, tuple[int, ...]] = {}
        for part in text[len("custom:"):].split(";"):
            key, _, value = part.partition("=")
            try:
                fields[key.strip()] = tuple(int(v) for v in value.split(","))
            except ValueError:
                raise BadInputError(f"variant {spec!r}: {key.strip()!r} must be comma-separated integers") from None
        if set(fields) != {"depths", "dims"}:
            raise BadInputError(f"variant {spec!r}: a custom variant needs exactly depths=... and dims=...")
        return fields["depths"], fields["dims"]
    raise BadInputError(
        f"unknown variant {spec!r}; expected one of {', '.join(VARIANTS)} "
        "or custom:depths=a,b,c,d;dims=w,x,y,z"
    )


def config_for(variant: str, num_classes: int = 1000, **kwargs: Any) -> ModelConfig:
    depths, dims = parse_variant(variant)
    return ModelConfig(depths=depths, dims=dims, num_classes=num_classes, head_norm=kwargs.pop("head_norm", True), **kwargs)


def check_variant(config: ModelConfig, expected: str | None, where: str) -> None:
    """Cross-check a user's ``--variant`` against the size detected from tensor shapes."""
    if expected is None:
        return
    depths, dims = parse_variant(expected)
    if (tuple(depths), tuple(dims)) != (tuple(config.depths), tuple(config.dims)):
        raise BadInputError(
            f"{where}: --variant {expected} expects depths={list(depths)} dims={list(dims)}, "
            f"but the tensors are {config.variant} (depths={list(config.depths)} dims={list(config.dims)})"
        )

