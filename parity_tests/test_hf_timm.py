"""Hugging Face transformers and timm formats, both ways, checked against the libraries themselves.

Parity bar: the one parity rule (convnextv2.reference.parity_rule; docs/parity.md): a peer's error against our
float64 referee is within the tolerance derived from our float32 reference's error against the same referee, on
the same inputs, and top-1 is identical. transformers, timm and the
``safetensors`` package are the independent oracles; ``torch.load(weights_only=True)`` reads original files
on the oracle side.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from convnextv2 import converters, fixtures, reference
from convnextv2.converters import hf as hf_format
from convnextv2.converters import timm as timm_format
from convnextv2.converters.runners.peers import import_timm, import_transformers
from convnextv2.converters.safetensors_io import write_safetensors
from convnextv2.parity_tests.conftest_helpers import assert_same_tensors
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.parity_rule import seeded_images
from convnextv2.reference.variants import VARIANTS

pytestmark = [pytest.mark.peers, pytest.mark.torch]

# Default suite: two small sizes at reduced resolution; the slow suite runs every size at 224.
DEFAULT_CASES = [("atto", 64), ("femto", 64)]
BATCH = 2
CUSTOM = "custom:depths=1,1,2,1;dims=8,16,32,64"


# ------------------------------------------------------------ shared cases

class Case:
    """One original-layout fixture, its canonical checkpoint, and our fp32/fp64 logits on seeded images."""

    def __init__(self, directory: Path, variant: str, resolution: int, seed: int = 1):
        self.directory = directory
        self.variant, self.resolution = variant, resolution
        self.original = directory / f"convnextv2_{variant}_fixture.pt"
        fixtures.write_fixture(self.original, variant, "original", seed=seed)
        self.ckpt = converters.load(self.original)
        self.images = seeded_images(BATCH, resolution, seed=seed)
        self.ours32, self.ref64 = our_logits(self.ckpt, self.images)


def our_logits(ckpt, images):
    """Our fp32 reference output and the fp64 referee's, as float64 numpy.

    The referee is the fp32 build cast in place, parameter by parameter (float32 -> float64 is exact, so it
    equals ``reference.build(..., dtype="float64")``): huge then peaks near 8 GB instead of 11.
    """
    with torch.no_grad():
        model = reference.build(ckpt, "torch")
        ours32 = model(torch.from_numpy(images)).double().numpy()
        model.double()
        ref64 = model(torch.from_numpy(images).double()).numpy()
    del model
    gc.collect()
    return ours32, ref64


def assert_parity(peer: np.ndarray, case_ours32: np.ndarray, ref64: np.ndarray, what: str) -> float:
    ours_err = parity_rule.max_abs_error(case_ours32, ref64)
    peer_err = parity_rule.max_abs_error(peer, ref64)
    assert ours_err > 0, "fp32 and fp64 agree exactly: the referee is not running in float64"
    # The one parity rule, our float32 error as the yardstick (the top-1 check below is stricter than its own).
    verdict = parity_rule.judge("", peer, ref64, parity_rule.scale_aware_error(case_ours32, ref64))
    assert verdict.passed, (f"{what}: max|d| {peer_err:.3e} vs fp64, over the rule's tolerance "
                            f"{verdict.threshold:.3e} (our fp32 error {ours_err:.3e})")
    if peer.ndim == 2:  # logits or pooled features: top-1 too (feature maps have no meaningful argmax)
        assert (peer.argmax(-1) == ref64.argmax(-1)).all(), f"{what}: top-1 differs"
    print(f"{what}: peer {peer_err:.2e}, ours fp32 {ours_err:.2e} (ratio {peer_err / ours_err:.2f})")
    return peer_err


_CASES: dict[tuple[str, int], Case] = {}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_size_at_224_against_transformers_and_timm(tmp_path, variant):
    """Every size, full resolution: hf -> transformers, timm file -> timm, original file -> timm's filter."""
    case = Case(tmp_path, variant, 224)
    check_hf(case)
    check_timm(case)
    check_timm_on_original_file(case)


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_timm_cases")


def get_case(case_dir: Path, variant: str, resolution: int) -> Case:
    # One fixture per (size, resolution), shared by this module's default tests.
    key = (variant, resolution)
    if key not in _CASES:
        directory = case_dir / f"{variant}-{resolution}"
        directory.mkdir(exist_ok=True)
        _CASES[key] = Case(directory, variant, resolution)
    return _CASES[key]


def load_hf_model(transformers, directory: Path, headless: bool = False):
    cls = transformers.ConvNextV2Model if headless else transformers.ConvNextV2ForImageClassification
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    # transformers 4 reports lists, 5 sets: empty either way.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def file_bytes(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return {path.name: path.read_bytes()}


# ------------------------------------------------------------ original -> hf -> transformers

@pytest.mark.parametrize("variant,resolution", DEFAULT_CASES)
def test_original_to_hf_matches_transformers(case_dir, variant, resolution):
    check_hf(get_case(case_dir, variant, resolution))


def check_hf(case: Case) -> None:
    transformers = import_transformers()
    variant, resolution = case.variant, case.resolution
    out = case.directory / "hf"
    converters.save(converters.load(case.original), out, format="hf", overwrite=True)
    model = load_hf_model(transformers, out)
    with torch.no_grad():
        logits = model(torch.from_numpy(case.images)).logits.double().numpy()
    del model
    assert_parity(logits, case.ours32, case.ref64, f"transformers {variant}@{resolution}")

    config = json.loads((out / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6
    assert config["depths"] == list(case.ckpt.config.depths)
    assert config["hidden_sizes"] == list(case.ckpt.config.dims)
    assert config["architectures"] == ["ConvNextV2ForImageClassification"]
    with safetensors.safe_open(out / "model.safetensors", "np") as handle:
        assert handle.metadata()["format"] == "pt"


def test_hf_config_labels_and_preprocessor_as_transformers_reads_them(case_dir):
    transformers = import_transformers()
    timm = import_timm()
    case = get_case(case_dir, "atto", 64)
    out = case.directory / "hf-labels"
    converters.save(case.ckpt, out, format="hf", overwrite=True)
    config = transformers.AutoConfig.from_pretrained(out)
    info = timm.data.ImageNetInfo()
    assert config.num_labels == 1000
    assert [config.id2label[i] for i in range(1000)] == [info.index_to_description(i) for i in range(1000)]
    assert config.layer_norm_eps == 1e-6 and config.image_size == 224
    processor = transformers.ConvNextImageProcessor.from_pretrained(out)
    pre = case.ckpt.preprocessing
    assert processor.crop_pct == pre.crop_pct and processor.size == {"shortest_edge": pre.input_size}
    assert int(processor.resample) == 3  # PIL bicubic
    assert list(processor.image_mean) == list(pre.mean) and list(processor.image_std) == list(pre.std)


# ------------------------------------------------------------ original -> timm -> timm

@pytest.mark.parametrize("variant,resolution", DEFAULT_CASES)
def test_original_to_timm_matches_timm(case_dir, variant, resolution):
    check_timm(get_case(case_dir, variant, resolution))


def check_timm(case: Case) -> None:
    timm = import_timm()
    variant, resolution = case.variant, case.resolution
    out = case.directory / "timm.safetensors"
    converters.save(converters.load(case.original), out, format="timm", overwrite=True)
    model = timm.create_model(f"convnextv2_{variant}", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out))).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(case.images)).double().numpy()
    del model
    assert_parity(logits, case.ours32, case.ref64, f"timm {variant}@{resolution}")

    stored = safetensors.numpy.load_file(out)
    width = case.ckpt.config.dims[0]
    fc1 = stored["stages.0.blocks.0.mlp.fc1.weight"].shape
    assert fc1 == ((4 * width, width, 1, 1) if variant in ("atto", "femto", "pico", "nano") else (4 * width, width))
    assert stored["stages.0.blocks.0.mlp.grn.weight"].shape == (4 * width,)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["architecture"] == f"convnextv2_{variant}" and sidecar["pretrained_cfg"]["crop_pct"] == 0.875


def test_custom_size_timm_file_builds_with_the_documented_constructor(tmp_path):
    timm = import_timm()
    ckpt = fixtures.make_checkpoint(CUSTOM, 4, "original", num_classes=10)
    out = tmp_path / "custom.safetensors"
    converters.save(ckpt, out, format="timm")
    args = json.loads(out.with_suffix(".json").read_text())["model_args"]
    assert args["conv_mlp"] is False
    model = timm.models.convnext.ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), conv_mlp=False, use_grn=True,
                                          ls_init_value=None, num_classes=10)
    model.load_state_dict(safetensors.torch.load_file(out), strict=True)
    images = seeded_images(BATCH, 64, seed=4)
    ours32, ref64 = our_logits(ckpt, images)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(images)).double().numpy()
    assert_parity(logits, ours32, ref64, "timm custom ConvNeXt(...)")
    # A folder output is timm's hub layout: local-dir loading rebuilds the custom size from model_args.
    folder = tmp_path / "hub"
    converters.save(ckpt, folder, format="timm")
    assert (folder / "model.safetensors").read_bytes() == out.read_bytes()
    assert (folder / "config.json").read_bytes() == out.with_suffix(".json").read_bytes()
    assert converters.detect_format(folder) == "timm"
    hub_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(hub_model(torch.from_numpy(images)).double().numpy(), logits)
    assert_same_tensors(dict(converters.load(folder).tensors), dict(ckpt.tensors))


# ------------------------------------------------------------ timm's own loader on the original file

@pytest.mark.parametrize("variant,resolution", DEFAULT_CASES)
def test_reference_matches_timm_loading_the_original_file(case_dir, variant, resolution):
    check_timm_on_original_file(get_case(case_dir, variant, resolution))


def check_timm_on_original_file(case: Case) -> None:
    """An oracle independent of our code: timm's own checkpoint_filter_fn on the original file vs our canonical conversion."""
    timm = import_timm()
    from timm.models.convnext import checkpoint_filter_fn

    variant, resolution = case.variant, case.resolution
    model = timm.create_model(f"convnextv2_{variant}", pretrained=False)
    # The fixture carries training args as an argparse.Namespace, as released files do: plain data.
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(case.original, map_location="cpu", weights_only=True, mmap=True)
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    del state
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(case.images)).double().numpy()
        # In float64 the two implementations must agree to rounding: a far sharper check of the mapping.
        logits64 = model.double()(torch.from_numpy(case.images).double()).numpy()
    del model
    gc.collect()
    assert_parity(logits, case.ours32, case.ref64, f"timm(original file) {variant}@{resolution}")
    scale = float(np.abs(case.ref64).max())
    err64 = float(np.abs(logits64 - case.ref64).max())
    print(f"timm(original file) float64 {variant}@{resolution}: max|d| vs our referee {err64:.2e}")
    assert err64 <= 1e-12 * max(scale, 1.0)


# ------------------------------------------------------------ round trips

def test_hf_round_trip_is_byte_exact(tmp_path):
    src = tmp_path / "a.pt"
    fixtures.write_fixture(src, "atto", "original", seed=2)
    first, canonical, second = tmp_path / "hf1", tmp_path / "c.safetensors", tmp_path / "hf2"
    converters.save(converters.load(src), first, format="hf")
    converters.save(converters.load(first), canonical, format="canonical")
    converters.save(converters.load(canonical), second, format="hf")
    assert file_bytes(first) == file_bytes(second)
    # The weights file alone (a bare HF state dict) is recognised and reads to the same tensors.
    assert converters.detect_format(first / "model.safetensors") == "hf"
    assert_same_tensors(dict(converters.load(first / "model.safetensors").tensors),
                        dict(converters.load(src).tensors))


def test_timm_round_trip_is_byte_exact(tmp_path):
    src = tmp_path / "a.pt"
    fixtures.write_fixture(src, "atto", "original", seed=2)
    first, canonical, second = tmp_path / "t1.safetensors", tmp_path / "c.safetensors", tmp_path / "t2.safetensors"
    converters.save(converters.load(src), first, format="timm")
    converters.save(converters.load(first), canonical, format="canonical")
    converters.save(converters.load(canonical), second, format="timm")
    assert first.read_bytes() == second.read_bytes()
    assert first.with_suffix(".json").read_bytes() == second.with_suffix(".json").read_bytes()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("headless", [False, True], ids=["classifier", "headless"])
def test_directories_written_by_transformers_read_back_exactly(tmp_path, safe, headless):
    transformers = import_transformers()
    config = transformers.ConvNextV2Config(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 32, 64], num_labels=7,
                                           layer_norm_eps=1e-6)
    cls = transformers.ConvNextV2Model if headless else transformers.ConvNextV2ForImageClassification
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # GRN and norms away from identity
            param.add_(0.05 * torch.randn_like(param))
    folder = tmp_path / "peer"
    model.save_pretrained(folder, safe_serialization=safe)
    if not safe and not (folder / "pytorch_model.bin").exists():
        pytest.skip(f"transformers {transformers.__version__} writes safetensors only (safe_serialization=False "
                    "is ignored since 5.0); the .bin case runs under 4.x")
    assert converters.detect_format(folder) == "hf"
    weights = folder / ("model.safetensors" if safe else "pytorch_model.bin")
    assert converters.detect_format(weights) == "hf"  # a .bin torch zip is not claimed by `original`
    ckpt = converters.load(folder)
    assert ckpt.config.num_classes == (0 if headless else 7) and ckpt.config.head_norm
    peer_state = {k: v.numpy() for k, v in model.state_dict().items()}
    back = tmp_path / "back"
    converters.save(ckpt, back, format="hf")
    written = safetensors.numpy.load_file(back / "model.safetensors")
    assert_same_tensors(written, peer_state)
    if not headless:
        labels = json.loads((back / "config.json").read_text())["id2label"]
        assert labels == {str(k): v for k, v in config.id2label.items()}
    images = seeded_images(BATCH, 64, seed=5)
    ours32, ref64 = our_logits(ckpt, images)
    with torch.no_grad():
        out = model(torch.from_numpy(images))
        peer = (out.pooler_output if headless else out.logits).double().numpy()
    assert_parity(peer, ours32, ref64, f"transformers-written {'headless' if headless else 'classifier'}")


def test_files_written_by_timm_read_back_exactly(tmp_path):
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=5).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    peer_state = {k: v.numpy() for k, v in model.state_dict().items()}
    safe, pth = tmp_path / "peer.safetensors", tmp_path / "peer.pth"
    safetensors.torch.save_file(model.state_dict(), safe)
    torch.save(model.state_dict(), pth)
    for path in (safe, pth):
        assert converters.detect_format(path) == "timm", path
        ckpt = converters.load(path)
        assert ckpt.config.variant == "atto" and ckpt.config.num_classes == 5
        back = tmp_path / f"back-{path.suffix[1:]}.safetensors"
        converters.save(ckpt, back, format="timm")
        assert_same_tensors(safetensors.numpy.load_file(back), peer_state)


# ------------------------------------------------------------ eps, headless, bad inputs, warnings

def test_hf_config_with_eps_1e12_is_kept_and_warned(tmp_path):
    transformers = import_transformers()
    ckpt = fixtures.make_checkpoint(CUSTOM, 6, "original", num_classes=10)
    ours = tmp_path / "ours"
    converters.save(ckpt, ours, format="hf")
    # transformers' own default eps (1e-12), saved by transformers itself.
    config = transformers.ConvNextV2Config.from_pretrained(ours)
    config.layer_norm_eps = 1e-12
    model = transformers.ConvNextV2ForImageClassification.from_pretrained(ours, config=config).eval()
    peer_dir = tmp_path / "peer"
    model.save_pretrained(peer_dir)
    with pytest.warns(UserWarning, match="eps 1e-12.*original ConvNeXt V2 uses 1e-06"):
        loaded = converters.load(peer_dir)
    assert loaded.config.head_norm_eps == 1e-12
    images = seeded_images(BATCH, 64, seed=6)
    ours32, ref64 = our_logits(loaded, images)
    with torch.no_grad():
        peer = model(torch.from_numpy(images)).logits.double().numpy()
    assert_parity(peer, ours32, ref64, "transformers eps=1e-12")
    again = tmp_path / "again"
    with pytest.warns(UserWarning, match="1e-12"):
        converters.save(converters.load(peer_dir), again, format="hf")
    assert json.loads((again / "config.json").read_text())["layer_norm_eps"] == 1e-12


def test_headless_fcmae_encoder_to_hf(tmp_path):
    transformers = import_transformers()
    src = tmp_path / "fcmae.pt"
    fixtures.write_fixture(src, "atto", "fcmae", seed=7)
    ckpt = converters.load(src)
    assert not ckpt.config.head_norm
    out = tmp_path / "hf"
    with pytest.warns(UserWarning, match="unit placeholder"):
        converters.save(ckpt, out, format="hf")
    model = load_hf_model(transformers, out, headless=True)
    images = seeded_images(BATCH, 64, seed=7)
    with torch.no_grad():
        result = model(torch.from_numpy(images))
        ref64 = reference.run_features(reference.build(ckpt, "torch", dtype="float64"), "torch", images)
        ours32 = reference.run_features(reference.build(ckpt, "torch"), "torch", images)
    hidden = result.last_hidden_state.double().numpy()
    assert_parity(hidden, ours32["stage4"].astype(np.float64), ref64["stage4"], "transformers headless stage4")
    # pooler_output is LayerNorm(mean) with the unit placeholder: the documented difference, computed independently.
    normed = torch.nn.functional.layer_norm(torch.from_numpy(ref64["pooled"]), (320,), eps=1e-6).numpy()
    np.testing.assert_allclose(result.pooler_output.double().numpy(), normed, atol=1e-4)
    back = converters.load(out)
    assert not back.config.head_norm and set(back.tensors) == set(ckpt.tensors)
    again = tmp_path / "hf2"
    with pytest.warns(UserWarning, match="unit placeholder"):
        converters.save(back, again, format="hf")
    assert file_bytes(out) == file_bytes(again)


def test_hf_config_not_matching_weights_is_refused(tmp_path):
    ckpt = fixtures.make_checkpoint("atto", 0, "original")
    out = tmp_path / "hf"
    converters.save(ckpt, out, format="hf")
    config = json.loads((out / "config.json").read_text())
    config["depths"] = [2, 2, 8, 2]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInputError, match=r"depths is \[2, 2, 8, 2\] in config.json but the weights have \[2, 2, 6, 2\]"):
        converters.load(out)
    from convnextv2.parity_tests.conftest_helpers import run_cli

    result = run_cli("convert", str(out), "-o", str(tmp_path / "x.safetensors"), "--to", "canonical")
    assert result.returncode == 2 and "depths" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_transformers_451_warning(monkeypatch, tmp_path):
    with pytest.warns(RuntimeWarning, match="spectral norm"):
        hf_format.check_transformers_version("4.51.3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_format.check_transformers_version("4.57.6")
        hf_format.check_transformers_version("4.50.0")
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "4.51.0" if name == "transformers" else real_version(name))
    with pytest.warns(RuntimeWarning, match="transformers 4.51.0"):
        converters.save(fixtures.make_checkpoint(CUSTOM, 0, "original", num_classes=3), tmp_path / "hf", format="hf")
    with pytest.warns(RuntimeWarning, match="transformers 4.51.0"):
        converters.load(tmp_path / "hf")


def test_sniffers_claim_only_their_own_files(tmp_path):
    ckpt = fixtures.make_checkpoint("atto", 0, "original")
    paths = {
        "original": tmp_path / "o.pt",
        "canonical": tmp_path / "c.safetensors",
        "hf": tmp_path / "hf",
        "timm": tmp_path / "t.safetensors",
    }
    fixtures.write_fixture(paths["original"], "atto", "original")
    for fmt in ("canonical", "hf", "timm"):
        converters.save(ckpt, paths[fmt], format=fmt)
    # A Flax-style safetensors file (another engineer's format) must not be claimed by hf or timm.
    flax_like = tmp_path / "flax.safetensors"
    write_safetensors(flax_like, [("stages.0.blocks.0.dwconv.kernel", np.zeros((7, 7, 1, 40), np.float32)),
                                  ("stem.conv.kernel", np.zeros((4, 4, 3, 40), np.float32))], {"format": "flax"})
    for fmt, path in paths.items():
        assert converters.detect_format(path) == fmt, path
        assert hf_format.sniff(path) == (fmt == "hf"), path
        assert timm_format.sniff(path) == (fmt == "timm"), path
    assert not hf_format.sniff(flax_like) and not timm_format.sniff(flax_like)
    random_bytes = tmp_path / "noise.bin"
    random_bytes.write_bytes(os.urandom(4096))
    assert not hf_format.sniff(random_bytes) and not timm_format.sniff(random_bytes)


# ------------------------------------------------------------ TensorFlow (transformers 4.57 + tf-keras)

TF_SCRIPT = """
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np
from convnextv2.converters.runners.peers import import_transformers
transformers = import_transformers(tensorflow=True)
model = transformers.TFConvNextV2ForImageClassification.from_pretrained(sys.argv[1], from_pt=True)
images = np.load(sys.argv[2])
np.save(sys.argv[3], model(images, training=False).logits.numpy())
"""


@pytest.mark.tf
def test_hf_output_loads_in_tensorflow_from_pt(tmp_path):
    if int(importlib.metadata.version("transformers").split(".")[0]) >= 5:
        pytest.skip("transformers 5 has no TensorFlow classes; this runs under 4.57.6 in the default suite")
    case_dir = tmp_path
    src = case_dir / "a.pt"
    fixtures.write_fixture(src, "atto", "original", seed=8)
    ckpt = converters.load(src)
    out = case_dir / "hf"
    converters.save(ckpt, out, format="hf")
    images = seeded_images(BATCH, 64, seed=8)
    np.save(case_dir / "images.npy", images)
    # A subprocess: tf-keras (Keras 2) and Keras 3 must not meet in one interpreter.
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    # import_transformers() in this process set USE_TF=0 to keep TF out of the PyTorch tests.
    env["USE_TF"] = "1"
    env.pop("USE_FLAX", None)
    result = subprocess.run([sys.executable, "-c", TF_SCRIPT, str(out), str(case_dir / "images.npy"),
                             str(case_dir / "logits.npy")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peer = np.load(case_dir / "logits.npy").astype(np.float64)
    ours32, ref64 = our_logits(ckpt, images)
    assert_parity(peer, ours32, ref64, "transformers TF (from_pt)")


def test_sharded_transformers_directory_is_read(tmp_path):
    transformers = import_transformers()
    config = transformers.ConvNextV2Config(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 32, 64], num_labels=4,
                                           layer_norm_eps=1e-6)
    torch.manual_seed(1)
    model = transformers.ConvNextV2ForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ckpt = converters.load(tmp_path / "sharded")
    back = tmp_path / "back"
    converters.save(ckpt, back, format="hf")
    assert_same_tensors(safetensors.numpy.load_file(back / "model.safetensors"),
                        {k: v.numpy() for k, v in model.state_dict().items()})


def test_headless_fcmae_encoder_to_timm_loads_with_the_fcmae_tag(tmp_path):
    timm = import_timm()
    src = tmp_path / "fcmae.pt"
    fixtures.write_fixture(src, "atto", "fcmae", seed=9)
    ckpt = converters.load(src)
    out = tmp_path / "enc.safetensors"
    with pytest.warns(UserWarning, match="no final LayerNorm"):
        converters.save(ckpt, out, format="timm")
    assert "head.norm.weight" not in safetensors.numpy.load_file(out)
    model = timm.create_model("convnextv2_atto.fcmae", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out))).eval()
    images = seeded_images(BATCH, 64, seed=9)
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(images)).double().numpy()
    ref64 = reference.run_features(reference.build(ckpt, "torch", dtype="float64"), "torch", images)["stage4"]
    ours32 = reference.run_features(reference.build(ckpt, "torch"), "torch", images)["stage4"].astype(np.float64)
    assert_parity(features, ours32, ref64, "timm fcmae encoder stage4")
    assert_same_tensors(dict(converters.load(out).tensors), dict(ckpt.tensors))
