"""Layout transforms (reference/layouts.py) and the key tables that name them.

Every layout must round-trip exactly in both directions and agree with itself on shapes; each permutation
and reshape is also checked element by element against its written definition (written out independently
below, index by index), so a wrong axis order cannot pass just because it inverts itself.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from convnextv2.converters import hf, original, timm
from convnextv2.reference import layouts, schema
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.flax_layout import NNX_KEYS
from convnextv2.reference.keras_layout import KERAS_KEYS, keras_paths
from convnextv2.reference.variants import config_for

# A canonical shape for each layout, with distinct sizes per axis so a swapped axis changes the shape.
CANONICAL_SHAPES = {
    "identity": (5, 3, 4, 2),
    "vector": (7,),
    "conv_hwio": (5, 3, 4, 2),
    "keras_depthwise": (6, 1, 7, 5),
    "flax_depthwise": (6, 1, 7, 5),
    "dense_transpose": (5, 3),
    "conv_mlp": (8, 3),
    "sparse_conv": (5, 3, 2, 2),
    "sparse_depthwise": (6, 1, 7, 7),
    "sparse_bias": (6,),
    "grn": (8,),
}
ALL_LAYOUTS = [*layouts.NAMED, layouts.grn((1, -1))]


def _random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _id(layout):
    return f"{layout.name}{getattr(layout, 'stored', '')}"


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=_id)
def test_layout_round_trips_exactly_and_agrees_on_shapes(layout):
    shape = CANONICAL_SHAPES[layout.name]
    canonical = _random(shape)
    foreign = layout.to_foreign(canonical)
    assert tuple(foreign.shape) == layout.foreign_shape(shape)
    if layout.rank is not None:
        assert foreign.ndim == layout.rank
    assert layout.holds(foreign.shape)
    assert layout.canonical_shape(layout.foreign_shape(shape)) == shape
    back = layout.to_canonical(foreign, "test")
    assert back.dtype == canonical.dtype and back.shape == canonical.shape
    np.testing.assert_array_equal(back, canonical, strict=True)
    # And from the foreign side: a random array in the stored layout comes back unchanged.
    stored = _random(layout.foreign_shape(shape), seed=1)
    np.testing.assert_array_equal(layout.to_foreign(layout.to_canonical(stored, "test")), stored, strict=True)


def _each_index(shape):
    return itertools.product(*(range(n) for n in shape))


def test_conv_hwio_is_oihw_to_hwio():
    w = _random((5, 3, 4, 2))
    f = layouts.CONV_HWIO.to_foreign(w)
    assert f.shape == (4, 2, 3, 5)
    for o, i, h, x in _each_index(w.shape):
        assert f[h, x, i, o] == w[o, i, h, x]


def test_keras_depthwise_is_kh_kw_channels_multiplier():
    w = _random((6, 1, 7, 5))
    f = layouts.KERAS_DEPTHWISE.to_foreign(w)
    assert f.shape == (7, 5, 6, 1)
    for c, _, h, x in _each_index(w.shape):
        assert f[h, x, c, 0] == w[c, 0, h, x]


def test_flax_depthwise_is_kh_kw_one_channels():
    w = _random((6, 1, 7, 5))
    f = layouts.FLAX_DEPTHWISE.to_foreign(w)
    assert f.shape == (7, 5, 1, 6)
    for c, _, h, x in _each_index(w.shape):
        assert f[h, x, 0, c] == w[c, 0, h, x]


def test_dense_transpose_is_in_out():
    w = _random((5, 3))
    f = layouts.DENSE_TRANSPOSE.to_foreign(w)
    assert f.shape == (3, 5)
    for o, i in _each_index(w.shape):
        assert f[i, o] == w[o, i]


def test_conv_mlp_is_a_1x1_convolution():
    w = _random((8, 3))
    f = layouts.CONV_MLP.to_foreign(w)
    assert f.shape == (8, 3, 1, 1)
    for o, i in _each_index(w.shape):
        assert f[o, i, 0, 0] == w[o, i]


def test_sparse_conv_taps_enumerate_the_first_spatial_coordinate_fastest():
    # A 3x3 kernel (k*k = 9) so that h and w are distinguishable; the model's own are 2x2.
    k = 3
    w = _random((5, 4, k, k))
    kernel = layouts.SPARSE_CONV.to_foreign(w)
    assert kernel.shape == (k * k, 4, 5)
    for o, i, h, x in _each_index(w.shape):
        assert kernel[x * k + h, i, o] == w[o, i, h, x]


def test_sparse_depthwise_taps_enumerate_the_first_spatial_coordinate_fastest():
    k = 7
    w = _random((6, 1, k, k))
    kernel = layouts.SPARSE_DEPTHWISE.to_foreign(w)
    assert kernel.shape == (k * k, 6)
    for c, _, h, x in _each_index(w.shape):
        assert kernel[x * k + h, c] == w[c, 0, h, x]


@pytest.mark.parametrize(("layout", "stored"), [
    (layouts.HF_GRN, (1, 1, 1, 8)), (layouts.grn((1, -1)), (1, 8)), (layouts.TIMM_GRN, (8,)),
    (layouts.SPARSE_BIAS, (1, 8)),
], ids=["hf", "fcmae", "timm", "sparse-bias"])
def test_stored_vectors_keep_element_order(layout, stored):
    v = _random((8,))
    f = layout.to_foreign(v)
    assert f.shape == stored
    np.testing.assert_array_equal(f.reshape(-1), v, strict=True)
    # Reading takes any shape of leading 1s, whatever the layout writes.
    for shape in ((8,), (1, 8), (1, 1, 1, 8)):
        np.testing.assert_array_equal(layout.to_canonical(v.reshape(shape), "test"), v, strict=True)


@pytest.mark.parametrize(("layout", "shape", "message"), [
    (layouts.CONV_HWIO, (4, 4, 3), "rank-4"),
    (layouts.DENSE_TRANSPOSE, (3,), "rank-2"),
    (layouts.VECTOR, (1, 3), "rank-1"),
    (layouts.CONV_MLP, (8, 3, 3, 3), "(out, in, 1, 1)"),
    (layouts.SPARSE_CONV, (4, 3), "(k*k, in, out)"),
    (layouts.SPARSE_CONV, (5, 3, 2), "5 taps, not a square kernel"),
    (layouts.SPARSE_DEPTHWISE, (49, 1, 6), "(k*k, channels)"),
    (layouts.SPARSE_DEPTHWISE, (48, 6), "48 taps"),
    (layouts.HF_GRN, (2, 8), "leading 1s"),
    (layouts.HF_GRN, (), "leading 1s"),
], ids=lambda value: value.name if isinstance(value, layouts.Layout) else None)
def test_to_canonical_refuses_arrays_not_in_the_layout(layout, shape, message):
    assert not layout.holds(shape)
    with pytest.raises(BadInputError, match="^model.pt: some.key: ") as excinfo:
        layout.to_canonical(np.zeros(shape, np.float32), "model.pt: some.key")
    text = str(excinfo.value)
    assert message in text
    if "taps" not in message:
        assert f"found shape {list(shape)}" in text


def test_stored_vector_shape_must_be_leading_ones_then_the_length():
    for bad in ((2, -1), (1, -1, 1), (), (1, 1)):
        with pytest.raises(BadInputError, match="leading 1s then -1"):
            layouts.grn(bad)


# ------------------------------------------------------------ the key tables that name them

FULL = config_for("atto")
ENCODER = config_for("atto", num_classes=0, head_norm=False)
TABLES = {
    "original-finetuned": (original.DENSE, FULL),
    "original-fcmae": (original.key_table("fcmae"), ENCODER),
    "original-sparse": (original.SPARSE, ENCODER),
    "hf": (hf.KEYS, FULL),
    "timm-linear": (timm.KEYS, FULL),
    "timm-conv-mlp": (timm.CONV_MLP_KEYS, FULL),
    "keras": (KERAS_KEYS, FULL),
    "flax": (NNX_KEYS, FULL),
}


@pytest.mark.parametrize("table_name", list(TABLES))
def test_every_table_covers_the_schema_both_ways(table_name):
    """Each canonical tensor has one foreign key, that key maps back to it, and its layout round-trips."""
    table, config = TABLES[table_name]
    foreign_keys = set()
    for index, (name, shape) in enumerate(schema.expected_shapes(config).items()):
        found = table.to_foreign(name)
        assert found is not None, f"{table_name}: no foreign key for {name}"
        key, rule = found
        assert key not in foreign_keys, f"{table_name}: two tensors map to {key}"
        foreign_keys.add(key)
        assert table.to_canonical(key) == (name, rule)
        canonical = _random(shape, seed=index)
        stored = rule.transform.to_foreign(canonical)
        assert tuple(stored.shape) == rule.transform.foreign_shape(shape)
        np.testing.assert_array_equal(rule.transform.to_canonical(stored, key), canonical, strict=True)


def test_tables_use_the_layout_each_format_stores():
    """The layout each format's file holds for the tensors that change layout (independently of the code)."""
    def layout_of(table, name):
        return table.to_foreign(name)[1].transform

    block = "stages.1.blocks.0"
    assert layout_of(KERAS_KEYS, "stem.conv.weight") is layouts.CONV_HWIO
    assert layout_of(KERAS_KEYS, f"{block}.dwconv.weight") is layouts.KERAS_DEPTHWISE
    assert layout_of(KERAS_KEYS, f"{block}.pwconv1.weight") is layouts.DENSE_TRANSPOSE
    assert layout_of(NNX_KEYS, "stages.2.downsample.conv.weight") is layouts.CONV_HWIO
    assert layout_of(NNX_KEYS, f"{block}.dwconv.weight") is layouts.FLAX_DEPTHWISE
    assert layout_of(NNX_KEYS, "head.fc.weight") is layouts.DENSE_TRANSPOSE
    assert layout_of(hf.KEYS, f"{block}.grn.gamma") == layouts.grn((1, 1, 1, -1))
    assert layout_of(timm.KEYS, f"{block}.grn.beta") == layouts.grn((-1,))
    assert layout_of(timm.CONV_MLP_KEYS, f"{block}.pwconv2.weight") is layouts.CONV_MLP
    assert layout_of(timm.KEYS, f"{block}.pwconv2.weight") is layouts.IDENTITY
    assert layout_of(original.DENSE, f"{block}.grn.gamma") == layouts.grn((1, 1, 1, -1))
    assert layout_of(original.key_table("fcmae"), f"{block}.grn.gamma") == layouts.grn((1, -1))
    assert layout_of(original.key_table("finetuned", [1, -1]), f"{block}.grn.beta") == layouts.grn((1, -1))
    assert layout_of(original.SPARSE, "stages.3.downsample.conv.weight") is layouts.SPARSE_CONV
    assert layout_of(original.SPARSE, f"{block}.dwconv.weight") is layouts.SPARSE_DEPTHWISE
    assert layout_of(original.SPARSE, f"{block}.dwconv.bias") is layouts.SPARSE_BIAS
    for table in (original.DENSE, hf.KEYS, timm.KEYS):
        assert layout_of(table, "stem.conv.weight") is layouts.IDENTITY
        assert layout_of(table, f"{block}.dwconv.weight") is layouts.IDENTITY


def test_keras_paths_follow_the_schema_in_forward_order():
    paths = keras_paths(FULL)
    assert [name for name, _ in paths.values()] == list(schema.expected_shapes(FULL))
    assert paths["stages.1.blocks.0.dwconv/kernel"] == ("stages.1.blocks.0.dwconv.weight", layouts.KERAS_DEPTHWISE)
