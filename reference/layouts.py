"""Every layout change between a canonical tensor and a format's stored one, each defined once, both ways.

A ``Layout`` turns a canonical array (the PyTorch layouts of ``schema.LAYOUTS``) into the array a format
stores (``to_foreign``) and back (``to_canonical``), and does the same for shapes, so a reader can check a
file's shapes before it moves any data. Key tables (``reference.keymap.Rule.transform``) name one of the
instances below for each tensor; no format module interprets layouts itself.

``to_canonical`` validates the foreign array and raises a one-line ``BadInputError`` naming ``where``;
``to_foreign`` takes a canonical array that has already been validated against the schema.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from convnextv2.reference.errors import BadInputError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """The identity: the stored array is the canonical one. Subclasses below change the layout."""

    name: str

    @property
    def rank(self) -> int | None:
        """The rank every stored array of this layout has; None when several ranks are read."""
        return None

    def problem(self, foreign_shape: Sequence[int]) -> str | None:
        """Why an array of this stored shape cannot be read in this layout; None when it can."""
        return None

    def holds(self, foreign_shape: Sequence[int]) -> bool:
        return self.problem(foreign_shape) is None

    def _check(self, foreign_shape: Sequence[int], where: str) -> None:
        problem = self.problem(foreign_shape)
        if problem is not None:
            raise BadInputError(f"{where}: {problem}")

    def to_foreign(self, array: np.ndarray) -> np.ndarray:
        return array

    def to_canonical(self, array: np.ndarray, where: str = "array") -> np.ndarray:
        self._check(array.shape, where)
        return array

    def foreign_shape(self, canonical_shape: Sequence[int]) -> Shape:
        return tuple(canonical_shape)

    def canonical_shape(self, foreign_shape: Sequence[int], where: str = "array") -> Shape:
        self._check(foreign_shape, where)
        return tuple(foreign_shape)


@dataclass(frozen=True)
class FixedRank(Layout):
    """The identity on arrays of one rank (readers that know every tensor's rank check it)."""

    fixed_rank: int = 1

    @property
    def rank(self) -> int:
        return self.fixed_rank

    def problem(self, foreign_shape: Sequence[int]) -> str | None:
        if len(foreign_shape) != self.fixed_rank:
            return f"expected a rank-{self.fixed_rank} array ({self.name}), found shape {list(foreign_shape)}"
        return None


@dataclass(frozen=True)
class Permutation(Layout):
    """Axis permutation: ``foreign = canonical.transpose(axes)``, ``canonical = foreign.transpose(inverse)``."""

    axes: tuple[int, ...]
    inverse: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if sorted(self.axes) != list(range(len(self.axes))):
            raise ValueError(f"layout {self.name}: {self.axes} is not a permutation")
        object.__setattr__(self, "inverse", tuple(int(a) for a in np.argsort(self.axes)))

    @property
    def rank(self) -> int:
        return len(self.axes)

    def problem(self, foreign_shape: Sequence[int]) -> str | None:
        if len(foreign_shape) != self.rank:
            return f"expected a rank-{self.rank} array ({self.name}), found shape {list(foreign_shape)}"
        return None

    def to_foreign(self, array: np.ndarray) -> np.ndarray:
        return np.transpose(array, self.axes)

    def to_canonical(self, array: np.ndarray, where: str = "array") -> np.ndarray:
        self._check(array.shape, where)
        return np.transpose(array, self.inverse)

    def foreign_shape(self, canonical_shape: Sequence[int]) -> Shape:
        return tuple(int(canonical_shape[a]) for a in self.axes)

    def canonical_shape(self, foreign_shape: Sequence[int], where: str = "array") -> Shape:
        self._check(foreign_shape, where)
        return tuple(int(foreign_shape[a]) for a in self.inverse)


@dataclass(frozen=True)
class StoredVector(Layout):
    """A canonical vector (n,) stored with leading 1s: ``stored`` is the shape written, -1 standing for n.
    Reading takes any shape of leading 1s ((n,), (1, n), (1, 1, 1, n)): libraries differ and the element
    order is the same in all of them."""

    stored: tuple[int, ...]

    def __post_init__(self) -> None:
        stored = tuple(self.stored)
        if not stored or stored[-1] != -1 or any(s != 1 for s in stored[:-1]):
            raise BadInputError(f"{self.name}: stored vector shape {list(stored)} should be leading 1s then -1")
        object.__setattr__(self, "stored", stored)

    def problem(self, foreign_shape: Sequence[int]) -> str | None:
        if len(foreign_shape) == 0 or any(s != 1 for s in foreign_shape[:-1]):
            return f"expected a vector with leading 1s ({self.name}), found shape {list(foreign_shape)}"
        return None

    def to_foreign(self, array: np.ndarray) -> np.ndarray:
        target = self.foreign_shape(array.shape)
        return array if tuple(array.shape) == target else array.reshape(target)

    def to_canonical(self, array: np.ndarray, where: str = "array") -> np.ndarray:
        self._check(array.shape, where)
        return array.reshape(array.shape[-1])

    def foreign_shape(self, canonical_shape: Sequence[int]) -> Shape:
        size = math.prod(canonical_shape)
        return tuple(size if s == -1 else s for s in self.stored)

    def canonical_shape(self, foreign_shape: Sequence[int], where: str = "array") -> Shape:
        self._check(foreign_shape, where)
        return (int(foreign_shape[-1]),)


@dataclass(frozen=True)
class Conv1x1(Layout):
    """A linear (out, in) stored as a 1x1 convolution (out, in, 1, 1)."""

    @property
    def rank(self) -> int:
        return 4

    def problem(self, foreign_shape: Sequence[int]) -> str | None:
        if len(foreign_shape) != 4 or tuple(foreign_shape[2:]) != (1, 1):
            return f"expected (out, in, 1, 1) ({self.name}), found shape {list(foreign_shape)}"
        return None

    def to_foreign(self, array: np.ndarray) -> np.ndarray:
        return array.reshape(*array.shape, 1, 1)

    def to_canonical(self, array: np.ndarray, where: str = "array") -> np.ndarray:
        self._check(array.shape, where)
        return array.reshape(array.shape[:2])

    def foreign_shape(self, canonical_shape: Sequence[int]) -> Shape:
        return (*(int(s) for s in canonical_shape), 1, 1)

    def canonical_shape(self, foreign_shape: Sequence[int], where: str = "array") -> Shape:
        self._check(foreign_shape, where)
        return (int(foreign_shape[0]), int(foreign_shape[1]))


def _side(volume: int) -> int:
    """The side k of a square kernel of ``volume`` taps (checked by ``problem``: k * k == volume)."""
    return int(round(volume ** 0.5))


@dataclass(frozen=True)
class SparseConv(Layout):
    """MinkowskiEngine's convolution kernel (k*k, in, out), first spatial coordinate fastest:
    canonical ``W[o, i, h, w] = K[w*k + h, i, o]``."""

    @property
    def rank(self) -> int:
        return 3

    def problem(self, foreign_shape: Sequence[int]) -> str | None:
        if len(foreign_shape) != 3:
            return f"sparse kernel should be (k*k, in, out), found shape {list(foreign_shape)}"
        if _side(int(foreign_shape[0])) ** 2 != int(foreign_shape[0]):
            return f"sparse kernel has {foreign_shape[0]} taps, not a square kernel"
        return None

    def to_foreign(self, array: np.ndarray) -> np.ndarray:
        c_out, c_in, k, _ = array.shape
        return array.transpose(3, 2, 1, 0).reshape(k * k, c_in, c_out)

    def to_canonical(self, array: np.ndarray, where: str = "array") -> np.ndarray:
        self._check(array.shape, where)
        volume, c_in, c_out = array.shape
        k = _side(volume)
        return array.reshape(k, k, c_in, c_out).transpose(3, 2, 1, 0)

    def foreign_shape(self, canonical_shape: Sequence[int]) -> Shape:
        c_out, c_in, kh, kw = (int(s) for s in canonical_shape)
        return (kh * kw, c_in, c_out)

    def canonical_shape(self, foreign_shape: Sequence[int], where: str = "array") -> Shape:
        self._check(foreign_shape, where)
        volume, c_in, c_out = (int(s) for s in foreign_shape)
        k = _side(volume)
        return (c_out, c_in, k, k)


@dataclass(frozen=True)
class SparseDepthwise(Layout):
    """MinkowskiEngine's depthwise kernel (k*k, C), first spatial coordinate fastest:
    canonical ``W[c, 0, h, w] = K[w*k + h, c]``."""

    @property
    def rank(self) -> int:
        return 2

    def problem(self, foreign_shape: Sequence[int]) -> str | None:
        if len(foreign_shape) != 2:
            return f"sparse depthwise kernel should be (k*k, channels), found shape {list(foreign_shape)}"
        if _side(int(foreign_shape[0])) ** 2 != int(foreign_shape[0]):
            return f"sparse depthwise kernel has {foreign_shape[0]} taps, not a square kernel"
        return None

    def to_foreign(self, array: np.ndarray) -> np.ndarray:
        channels, _, k, _ = array.shape
        return array[:, 0].transpose(2, 1, 0).reshape(k * k, channels)

    def to_canonical(self, array: np.ndarray, where: str = "array") -> np.ndarray:
        self._check(array.shape, where)
        volume, channels = array.shape
        k = _side(volume)
        return array.reshape(k, k, channels).transpose(2, 1, 0)[:, None, :, :]

    def foreign_shape(self, canonical_shape: Sequence[int]) -> Shape:
        channels, _, kh, kw = (int(s) for s in canonical_shape)
        return (kh * kw, channels)

    def canonical_shape(self, foreign_shape: Sequence[int], where: str = "array") -> Shape:
        self._check(foreign_shape, where)
        volume, channels = (int(s) for s in foreign_shape)
        k = _side(volume)
        return (channels, 1, k, k)


GRN = "grn"  # the name of every GRN layout, whatever its stored shape


def grn(stored: Sequence[int]) -> StoredVector:
    """GRN gamma/beta (4C,) as a library stores them, e.g. (1, 1, 1, -1) or (1, -1); -1 is 4C."""
    return StoredVector(GRN, tuple(int(s) for s in stored))


# ------------------------------------------------------------ the named layouts

IDENTITY = Layout("identity")
# Biases, LayerNorm and GRN parameters in formats that store them flat and always 1-D (Keras, Flax).
VECTOR = FixedRank("vector", 1)
# Convolution OIHW -> HWIO (Keras Conv2D, Flax nnx.Conv, TensorFlow): (out, in, kh, kw) -> (kh, kw, in, out).
CONV_HWIO = Permutation("conv_hwio", (2, 3, 1, 0))
# Depthwise (C, 1, kh, kw) -> Keras DepthwiseConv2D's (kh, kw, C, 1): (kh, kw, in channels, multiplier).
KERAS_DEPTHWISE = Permutation("keras_depthwise", (2, 3, 0, 1))
# Depthwise (C, 1, kh, kw) -> Flax nnx.Conv with feature_group_count=C, (kh, kw, 1, C): HWIO with one input
# per group, so the same axes as CONV_HWIO.
FLAX_DEPTHWISE = Permutation("flax_depthwise", (2, 3, 1, 0))
# Linear (out, in) -> a dense kernel (in, out) (Keras Dense, Flax nnx.Linear).
DENSE_TRANSPOSE = Permutation("dense_transpose", (1, 0))
# timm's small sizes (conv_mlp=True) store the MLP linears (out, in) as 1x1 convolutions (out, in, 1, 1).
CONV_MLP = Conv1x1("conv_mlp")
# The raw FCMAE pretraining checkpoint (MinkowskiEngine): kernels and biases (1, C).
SPARSE_CONV = SparseConv("sparse_conv")
SPARSE_DEPTHWISE = SparseDepthwise("sparse_depthwise")
SPARSE_BIAS = StoredVector("sparse_bias", (1, -1))
# GRN gamma/beta: transformers stores (1, 1, 1, 4C), timm (4C,); the original's shape depends on the file
# (fine-tuned (1, 1, 1, 4C), FCMAE (1, 4C)) and is built with ``grn`` from what the source recorded.
HF_GRN = grn((1, 1, 1, -1))
TIMM_GRN = grn((-1,))

NAMED: tuple[Layout, ...] = (
    IDENTITY, VECTOR, CONV_HWIO, KERAS_DEPTHWISE, FLAX_DEPTHWISE, DENSE_TRANSPOSE, CONV_MLP,
    SPARSE_CONV, SPARSE_DEPTHWISE, SPARSE_BIAS, HF_GRN, TIMM_GRN,
)
