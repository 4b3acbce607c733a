"""Foundation: variants, schema, canonical files, original layouts in and out, CLI basics."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import safetensors.numpy

from convnextv2 import converters, fixtures, reference
from convnextv2.parity_tests.conftest_helpers import assert_same_tensors, original_state, run_cli
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError, SchemaError
from convnextv2.reference.schema import parameter_count
from convnextv2.reference.variants import VARIANTS, ModelConfig, config_for, parse_variant

# Parameter counts as published for the released models (from the peers' model cards), not
# computed by this code: they check the schema's shapes independently.
PUBLISHED_PARAMS = {
    "atto": (3_708_400, 3_386_760), "femto": (5_233_240, 4_847_472), "pico": (9_066_280, 8_552_256),
    "nano": (15_623_800, 14_981_520), "tiny": (28_635_496, 27_864_960), "base": (88_717_800, 87_690_752),
    "large": (197_956_840, 196_416_768), "huge": (660_289_640, 657_467_008),
}
PUBLISHED_TENSOR_COUNTS = {"atto": 140, "femto": 140, "pico": 140, "nano": 160, "tiny": 200, "base": 380,
                           "large": 380, "huge": 380}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_schema_matches_published_sizes(variant):
    full = config_for(variant)
    encoder = config_for(variant, num_classes=0, head_norm=False)
    assert (parameter_count(full), parameter_count(encoder)) == PUBLISHED_PARAMS[variant]
    assert len(schema.expected_shapes(full)) == PUBLISHED_TENSOR_COUNTS[variant]
    shapes = schema.expected_shapes(full)
    assert schema.infer_config(shapes, "test") == full
    assert schema.infer_config(schema.expected_shapes(encoder), "test") == encoder


def test_variant_strings_decode_in_one_place():
    assert parse_variant("convnextv2_tiny") == VARIANTS["tiny"]
    assert parse_variant("custom:depths=1,1,2,1;dims=8,16,32,64") == ((1, 1, 2, 1), (8, 16, 32, 64))
    with pytest.raises(BadInputError, match="unknown variant 'giant'"):
        parse_variant("giant")
    with pytest.raises(BadInputError, match="4 stages"):
        ModelConfig(depths=(1, 1, 1), dims=(8, 16, 32))


def test_validate_reports_every_problem_at_once():
    config = config_for("atto")
    shapes = dict(schema.expected_shapes(config))
    del shapes["stages.2.blocks.3.grn.gamma"]
    shapes["stages.0.blocks.0.pwconv1.weight"] = (160, 41)
    shapes["stages.9.blocks.0.dwconv.weight"] = (1,)
    with pytest.raises(SchemaError) as info:
        schema.validate(shapes, config, "f.safetensors")
    text = str(info.value)
    assert len(info.value.problems) == 3
    assert "missing tensor stages.2.blocks.3.grn.gamma: expected shape [640]" in text
    assert "tensor stages.0.blocks.0.pwconv1.weight: expected shape [160, 40], found [160, 41]" in text
    assert "unexpected tensor stages.9.blocks.0.dwconv.weight" in text


@pytest.mark.parametrize("fmt", ["original", "fcmae", "fcmae-sparse"])
def test_original_round_trip_is_bit_exact(tmp_path, fmt):
    src = tmp_path / f"src-{fmt}.pt"
    fixtures.write_fixture(src, "atto", fmt, seed=3)
    canonical = tmp_path / "c.safetensors"
    back = tmp_path / "back.pt"
    converters.save(converters.load(src), canonical, format="canonical")
    converters.save(converters.load(canonical), back, format="original")
    before, after = original_state(src), original_state(back)
    assert_same_tensors(before, after)
    if fmt == "original":
        assert before["stages.0.0.grn.gamma"].shape == (1, 1, 1, 160)
    if fmt == "fcmae":
        assert "head.weight" not in before and "norm.weight" not in before
    if fmt == "fcmae-sparse":
        assert before["encoder.stages.0.0.dwconv.kernel"].shape == (49, 40)
        assert before["encoder.downsample_layers.1.1.kernel"].shape == (4, 40, 80)
        assert before["pred.weight"].shape == (3072, 512, 1, 1)


def test_sparse_decoder_is_preserved_under_extras(tmp_path):
    src = tmp_path / "sparse.pt"
    fixtures.write_fixture(src, "atto", "fcmae-sparse")
    ckpt = converters.load(src)
    extras = ckpt.extras()
    assert {"extras.fcmae.mask_token", "extras.fcmae.proj.weight", "extras.fcmae.pred.weight",
            "extras.fcmae.decoder.0.grn.gamma"} <= set(extras)
    state = original_state(src)
    for key, value in state.items():
        if not key.startswith("encoder."):
            np.testing.assert_array_equal(extras["extras.fcmae." + key], value)
    assert ckpt.config.num_classes == 0 and not ckpt.config.head_norm


def _minkowski_conv(x, kernel, k, stride, pad):
    """Independent sparse-conv semantics on a fully active grid: kernel taps enumerated with the first
    spatial coordinate (h) fastest, the convention documented for MinkowskiEngine kernels."""
    n, c_in, h, w = x.shape
    c_out = kernel.shape[-1]
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, c_out, out_h, out_w))
    for dw in range(k):
        for dh in range(k):
            tap = kernel[dw * k + dh]
            patch = padded[:, :, dh: dh + stride * out_h: stride, dw: dw + stride * out_w: stride]
            out += np.einsum("nihw,io->nohw", patch, tap)
    return out


def test_sparse_kernels_map_to_dense_convolutions(tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "sparse.pt"
    fixtures.write_fixture(src, "atto", "fcmae-sparse", seed=5)
    state = original_state(src)
    ckpt = converters.load(src)
    x = np.random.default_rng(0).standard_normal((1, 40, 8, 8))
    # Downsample conv 2x2/2: sparse kernel (4, in, out).
    sparse = _minkowski_conv(x, state["encoder.downsample_layers.1.1.kernel"].astype(np.float64), 2, 2, 0)
    dense = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(
        ckpt.tensors["stages.1.downsample.conv.weight"].astype(np.float64)), stride=2).numpy()
    np.testing.assert_allclose(dense, sparse, rtol=1e-12, atol=1e-12)
    # Depthwise 7x7: sparse kernel (49, C) is a per-channel diagonal tap.
    dw = state["encoder.stages.0.0.dwconv.kernel"].astype(np.float64)
    diag = np.stack([np.diag(dw[t]) for t in range(49)])
    sparse = _minkowski_conv(x, diag, 7, 1, 3)
    dense = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(
        ckpt.tensors["stages.0.blocks.0.dwconv.weight"].astype(np.float64)), padding=3, groups=40).numpy()
    np.testing.assert_allclose(dense, sparse, rtol=1e-12, atol=1e-12)


def test_canonical_file_metadata_and_peer_reader(tmp_path):
    src = tmp_path / "convnextv2_tiny_22k_384_ema.pt"
    fixtures.write_fixture(src, "atto", "original")
    dst = tmp_path / "c.safetensors"
    converters.save(converters.load(src), dst, format="canonical")
    # The safetensors package is an independent reader of our writer's bytes.
    peer = safetensors.numpy.load_file(dst)
    ours = converters.load(dst)
    assert_same_tensors(peer, dict(ours.tensors))
    with safetensors.safe_open(dst, "np") as handle:
        meta = handle.metadata()
    assert meta["schema"] == "convnextv2-canonical" and meta["schema_version"] == schema.SCHEMA_VERSION
    assert json.loads(meta["config"])["depths"] == [2, 2, 6, 2]
    pre = json.loads(meta["preprocessing"])
    assert pre["input_size"] == 384 and pre["crop_pct"] == 1.0 and pre["crop_mode"] == "squash"
    source = json.loads(meta["source"])
    assert source["format"] == "original" and source["file_name"] == src.name and len(source["sha256"]) == 64


def test_reader_accepts_files_written_by_the_safetensors_package(tmp_path):
    ckpt = fixtures.make_checkpoint("atto", 1, "canonical")
    path = tmp_path / "peer.safetensors"
    safetensors.numpy.save_file(dict(ckpt.ordered_tensors()), path, metadata=ckpt.metadata())
    assert_same_tensors(dict(converters.load(path).tensors), dict(ckpt.ordered_tensors()))


def test_same_input_same_bytes(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    for folder in (first, second):
        folder.mkdir()
        fixtures.write_fixture(folder / "ckpt.pt", "atto", "original", seed=2)
        converters.save(converters.load(folder / "ckpt.pt"), folder / "ckpt.safetensors")
        converters.save(converters.load(folder / "ckpt.safetensors"), folder / "back.pt", format="original")
    for name in ("ckpt.pt", "ckpt.safetensors", "back.pt"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_torch_reference_state_dict_keys_are_the_schema():
    torch = pytest.importorskip("torch")
    from convnextv2.reference.torch_model import ConvNeXtV2

    for config in (config_for("atto"), config_for("tiny", num_classes=0, head_norm=False),
                   ModelConfig(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=5)):
        model = ConvNeXtV2(config)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == schema.expected_shapes(config)
    model = reference.build(fixtures.make_checkpoint("atto", 0, "fcmae"), "torch")
    out = model(torch.zeros(1, 3, 64, 96))
    assert tuple(out.shape) == (1, 320) and not model.training
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.zeros(1, 3, 64, 70))


def test_torch_reference_float64_is_a_tight_referee():
    torch = pytest.importorskip("torch")
    from convnextv2.reference.parity_rule import seeded_images

    ckpt = fixtures.make_checkpoint("atto", 0, "original")
    images = seeded_images(2, 64)
    with torch.no_grad():
        f32 = reference.build(ckpt, "torch")(torch.from_numpy(images)).double()
        f64 = reference.build(ckpt, "torch", dtype="float64")(torch.from_numpy(images).double())
    err = float((f32 - f64).abs().max())
    # Measured fp32 vs fp64 for atto is ~5e-7; anything near 1e-4 would be a precision bug.
    assert 0 < err < 2e-5


def test_grn_and_norms_are_perturbed_in_fixtures():
    ckpt = fixtures.make_checkpoint("atto", 0, "original")
    for name in ("stages.0.blocks.0.grn.gamma", "stages.0.blocks.0.grn.beta", "stem.norm.bias", "head.norm.bias"):
        assert np.abs(ckpt.tensors[name]).min() > 0 and np.std(ckpt.tensors[name]) > 0.01, name
    assert np.std(ckpt.tensors["stem.norm.weight"] - 1) > 0.01


def test_variant_cross_check(tmp_path):
    src = tmp_path / "a.pt"
    fixtures.write_fixture(src, "atto", "original")
    assert converters.load(src, variant="atto").config.variant == "atto"
    with pytest.raises(BadInputError, match="--variant tiny expects depths=.3, 3, 9, 3.*but the tensors are atto"):
        converters.load(src, variant="tiny")


def test_ema_selection(tmp_path):
    from convnextv2.converters.torchzip import write_torch_zip

    ckpt = fixtures.make_checkpoint("atto", 0, "original")
    ema = fixtures.make_checkpoint("atto", 1, "original")
    from convnextv2.converters.original import canonical_to_state_dict

    path = tmp_path / "both.pt"
    write_torch_zip(path, {"model": canonical_to_state_dict(ckpt, "finetuned"),
                           "model_ema": canonical_to_state_dict(ema, "finetuned"), "epoch": 3})
    np.testing.assert_array_equal(converters.load(path).tensors["head.fc.bias"], ckpt.tensors["head.fc.bias"])
    np.testing.assert_array_equal(converters.load(path, ema=True).tensors["head.fc.bias"], ema.tensors["head.fc.bias"])
    bare = tmp_path / "bare.pt"
    write_torch_zip(bare, canonical_to_state_dict(ckpt, "finetuned"))
    assert converters.load(bare).config.num_classes == 1000
    with pytest.raises(BadInputError, match="--ema asked for model_ema"):
        converters.load(bare, ema=True)


def test_cli_end_to_end(tmp_path):
    result = run_cli("fixture", "--variant", "femto", "--format", "fcmae", "-o", str(tmp_path / "f.pt"))
    assert result.returncode == 0, result.stderr
    result = run_cli("inspect", str(tmp_path / "f.pt"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["variant"] == "femto" and info["num_classes"] == 0 and info["parameters"] == 4_847_472
    assert info["source"]["layout"]["layout"] == "fcmae"
    result = run_cli("convert", str(tmp_path / "f.pt"), "-o", str(tmp_path / "f.safetensors"), "--to", "canonical",
                     "--variant", "femto", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["to"] == "canonical"
    again = run_cli("convert", str(tmp_path / "f.pt"), "-o", str(tmp_path / "f.safetensors"), "--to", "canonical")
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    over = run_cli("convert", str(tmp_path / "f.pt"), "-o", str(tmp_path / "f.safetensors"), "--to", "canonical",
                   "--overwrite")
    assert over.returncode == 0, over.stderr
    table = run_cli("variants", "--json")
    assert [row["name"] for row in json.loads(table.stdout)] == list(VARIANTS)


def test_no_source_digest_skips_only_the_pending_hash(tmp_path):
    """--no-source-digest leaves the sha256 of the file being read out (no extra read of it); the tensors are the
    same, and a digest the source carries from an earlier conversion is kept."""
    src = tmp_path / "src.pt"
    fixtures.write_fixture(src, "atto", "original", seed=5)
    with_digest, without = tmp_path / "with.safetensors", tmp_path / "without.safetensors"
    for dst, extra in ((with_digest, []), (without, ["--no-source-digest"])):
        result = run_cli("convert", str(src), "-o", str(dst), "--to", "canonical", *extra)
        assert result.returncode == 0, result.stderr

    def source_of(path):
        with safetensors.safe_open(path, "np") as handle:
            return json.loads(handle.metadata()["source"])

    assert source_of(with_digest)["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert source_of(without)["sha256"] == ""
    assert_same_tensors(safetensors.numpy.load_file(without), safetensors.numpy.load_file(with_digest))
    again = tmp_path / "again.safetensors"
    result = run_cli("convert", str(with_digest), "-o", str(again), "--to", "canonical", "--no-source-digest")
    assert result.returncode == 0, result.stderr
    assert source_of(again)["sha256"] == source_of(with_digest)["sha256"]
