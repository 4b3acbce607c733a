"""Flax NNX reference and the ``flax`` file format.

Numbers are checked against the float64 PyTorch referee; the bar for float32 is the PyTorch float32
reference's own error against that referee, measured here on the same inputs (the parity rule,
convnextv2.reference.parity_rule; docs/parity.md). Run as a
script for the every-size figures and timings: ``python -m convnextv2.parity_tests.test_flax``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convnextv2 import converters, fixtures, reference
from convnextv2.converters import flax as flax_format
from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.fixtures.make import random_tensors
from convnextv2.parity_tests.conftest_helpers import assert_same_tensors, run_cli
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError, SchemaError
from convnextv2.reference.parity_rule import seeded_images
from convnextv2.reference.variants import VARIANTS, config_for

pytestmark = pytest.mark.flax

TINY = "custom:depths=1,1,2,1;dims=8,16,32,64"
FEATURES = parity_rule.FEATURES
# float64 Flax vs float64 PyTorch: measured ~1e-15; a float32 step anywhere would show as ~1e-7.
FP64_BAR = 1e-12
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ measurement (tests and the script share it)

scale_aware = parity_rule.scale_aware_error


def measure(ckpt: Checkpoint, images: np.ndarray, with_float64: bool = True) -> dict[str, Any]:
    """Flax float32 (and float64) and PyTorch float32 errors against the float64 PyTorch referee."""
    runs: dict[str, dict[str, np.ndarray]] = {}
    for framework, dtype in [("torch", "float64"), ("torch", "float32"), ("flax", "float32")] + (
            [("flax", "float64")] if with_float64 else []):
        model = reference.build(ckpt, framework, dtype=dtype)
        runs[f"{framework}{dtype[-2:]}"] = reference.run_features(model, framework, images)
        del model
    referee = runs.pop("torch64")
    result: dict[str, Any] = {"features": {}}
    for name in FEATURES:
        if name not in referee:
            continue
        result["features"][name] = {run: scale_aware(values[name], referee[name]) for run, values in runs.items()}
    if "logits" in referee:
        ref_top1 = referee["logits"].argmax(1)
        result["top1"] = {run: bool((values["logits"].argmax(1) == ref_top1).all()) for run, values in runs.items()}
    result["dtypes"] = {run: str(values["pooled"].dtype) for run, values in runs.items()}
    return result


def assert_parity(result: dict[str, Any], with_float64: bool = True) -> None:
    failures = []
    for name, errors in result["features"].items():
        bar = parity_rule.tolerance(errors["torch32"])
        if errors["flax32"] > bar:
            failures.append(f"{name}: flax float32 {errors['flax32']:.3e} > the rule's tolerance {bar:.3e} "
                            f"(torch float32 {errors['torch32']:.3e})")
        if with_float64 and errors["flax64"] > FP64_BAR:
            failures.append(f"{name}: flax float64 {errors['flax64']:.3e} > {FP64_BAR}")
    if "top1" in result:
        if not result["top1"]["flax32"]:
            failures.append("flax float32 top-1 differs from the referee")
        if with_float64 and not result["top1"]["flax64"]:
            failures.append("flax float64 top-1 differs from the referee")
    assert result["dtypes"]["flax32"] == "float32"
    if with_float64:
        assert result["dtypes"]["flax64"] == "float64"
    assert not failures, "\n".join(failures)


def _checkpoint(variant: str, seed: int = 0, num_classes: int = 1000, head_norm: bool = True,
                head_norm_eps: float = 1e-6) -> Checkpoint:
    config = config_for(variant, num_classes=num_classes, head_norm=head_norm).with_(head_norm_eps=head_norm_eps)
    return Checkpoint(config=config, tensors=random_tensors(config, seed))


# ------------------------------------------------------------ numerics

PARITY_CASES = {
    "atto-64": (dict(variant="atto"), (4, 64, 64)),
    # HF-style final norm eps, a small head and a non-square input.
    "tiny-custom-96x64-eps1e-12": (dict(variant=TINY, num_classes=10, head_norm_eps=1e-12), (4, 96, 64)),
    "headless-with-norm": (dict(variant=TINY, num_classes=0), (3, 64, 64)),
    "headless-fcmae-encoder": (dict(variant=TINY, num_classes=0, head_norm=False), (3, 64, 96)),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_flax_matches_float64_referee_like_torch_float32(case):
    options, (batch, height, width) = PARITY_CASES[case]
    ckpt = _checkpoint(seed=7, **options)
    images = np.random.default_rng(11).standard_normal((batch, 3, height, width), dtype=np.float32)
    result = measure(ckpt, images)
    assert set(result["features"]) == set(FEATURES) - (set() if ckpt.config.num_classes else {"logits"})
    assert_parity(result)


@pytest.mark.slow
@pytest.mark.parametrize("variant,size", [(v, 224) for v in VARIANTS] + [("tiny", 384), ("base", 384)])
def test_every_size_matches_float64_referee(variant, size):
    ckpt = fixtures.make_checkpoint(variant, seed=1)
    assert_parity(measure(ckpt, seeded_images(4 if variant != "huge" else 2, size, seed=2)))


def test_numerical_traps_are_avoided():
    """Each Flax/JAX default that differs from the original (tanh GELU, fast variance, spectral norm) would move the result far past the float32 bar; prove the model
    does not use them by computing one block both ways with plain jax.numpy."""
    import jax
    import jax.numpy as jnp

    from convnextv2.reference import flax_model

    ckpt = _checkpoint(TINY, seed=3)
    model = reference.build(ckpt, "flax")
    assert all(norm.use_fast_variance is False and norm.epsilon == 1e-6
               for norm in (model.stem.norm, model.stages[1].downsample.norm, model.stages[0].blocks[0].norm))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 64 * 4)), jnp.float32) * 3
    grn = model.stages[3].blocks[0].grn
    gamma, beta = np.asarray(grn.gamma[...], np.float64), np.asarray(grn.beta[...], np.float64)
    xd = np.asarray(x, np.float64)
    gx = np.sqrt((xd ** 2).sum(axis=(1, 2), keepdims=True))
    expected = gamma * (xd * gx / (gx.mean(-1, keepdims=True) + 1e-6)) + beta + xd
    assert np.abs(np.asarray(grn(x)) - expected).max() < 1e-5 * np.abs(expected).max()
    spectral = jnp.linalg.norm(x, ord=2, axis=(1, 2), keepdims=True)
    assert float(jnp.abs(spectral - gx).max()) > 1e-2  # the trap is real at this input
    y = jnp.linspace(-4, 4, 101, dtype=jnp.float32)
    assert float(jnp.abs(jax.nn.gelu(y) - jax.nn.gelu(y, approximate=False)).max()) > 1e-4
    assert flax_model.HIGHEST == jax.lax.Precision.HIGHEST


def test_float64_does_not_leak_x64_and_refuses_to_run_in_float32():
    import jax
    import jax.numpy as jnp

    ckpt = _checkpoint(TINY, seed=1)
    model = reference.build(ckpt, "flax", dtype="float64")
    out = reference.run_features(model, "flax", seeded_images(1, 32))
    assert out["logits"].dtype == np.float64
    assert not jax.config.jax_enable_x64
    assert jnp.ones(2).dtype == jnp.float32
    with pytest.raises(RuntimeError, match="enable_x64"):
        model(jnp.zeros((1, 32, 32, 3)))
    from flax import nnx

    with jax.enable_x64(True):
        direct = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(seeded_images(1, 32).transpose(0, 2, 3, 1), jnp.float64))
        assert direct.dtype == jnp.float64
    assert np.abs(np.asarray(direct) - out["logits"]).max() < FP64_BAR * np.abs(out["logits"]).max()


def test_input_checks_and_export_canonical():
    from convnextv2.reference import flax_model

    ckpt = _checkpoint(TINY, seed=2, num_classes=5)
    model = reference.build(ckpt, "flax")
    with pytest.raises(ValueError, match="divisible by 32"):
        reference.run_features(model, "flax", np.zeros((1, 3, 48, 64), np.float32))
    exported = flax_model.export_canonical(model)
    assert list(exported) == list(ckpt.model_tensors())
    assert_same_tensors(exported, ckpt.model_tensors())
    bad = dict(ckpt.tensors)
    bad["stages.2.blocks.1.grn.gamma"] = np.zeros(7, np.float32)
    with pytest.raises(SchemaError, match=r"stages\.2\.blocks\.1\.grn\.gamma: expected shape \[128\], found \[7\]"):
        flax_model.build_flax(ckpt.config, bad)


def test_forward_is_compiled_once_per_model_and_input_shape():
    from convnextv2.reference import flax_model

    model = reference.build(_checkpoint(TINY, seed=1, num_classes=4), "flax")
    reference.run_features(model, "flax", seeded_images(2, 64))
    forward = flax_model._COMPILED[model]
    reference.run_features(model, "flax", seeded_images(2, 64, seed=5))
    assert flax_model._COMPILED[model] is forward and forward._cache_size() == 1
    reference.run_features(model, "flax", seeded_images(1, 96))
    assert forward._cache_size() == 2


def test_run_features_honours_weights_updated_after_compilation():
    from flax import nnx

    images = seeded_images(2, 64)
    first = reference.build(_checkpoint(TINY, seed=1, num_classes=4), "flax")
    second = reference.build(_checkpoint(TINY, seed=2, num_classes=4), "flax")
    before = reference.run_features(first, "flax", images)["logits"]
    nnx.update(first, nnx.state(second))
    after = reference.run_features(first, "flax", images)["logits"]
    assert not np.array_equal(before, after)
    assert np.array_equal(after, reference.run_features(second, "flax", images)["logits"])


# ------------------------------------------------------------ the flax file

def _canonical_file(tmp_path: Path, fmt: str, dtype: str | None = None) -> Path:
    ckpt = fixtures.make_checkpoint(TINY, 4, fmt)
    if dtype is not None:
        ckpt.tensors = {k: v.astype(dtype) for k, v in ckpt.tensors.items()}
    path = tmp_path / f"canonical-{fmt}-{dtype}.safetensors"
    converters.save(ckpt, path, format="canonical")
    return path


@pytest.mark.parametrize("fmt,dtype", [("original", None), ("fcmae-sparse", None), ("canonical", "float64"),
                                       ("original", "float16")])
def test_canonical_flax_canonical_is_byte_identical(tmp_path, fmt, dtype):
    first = _canonical_file(tmp_path, fmt, dtype)
    flax_file, second = tmp_path / "model.safetensors", tmp_path / "back.safetensors"
    converters.save(converters.load(first), flax_file, format="flax")
    assert converters.detect_format(flax_file) == "flax"
    back = converters.load(flax_file)
    converters.save(back, second, format="canonical")
    assert first.read_bytes() == second.read_bytes()
    original = converters.load(first)
    assert_same_tensors(original.tensors, back.tensors)
    assert back.metadata() == original.metadata()


def test_flax_file_is_deterministic_and_in_flax_layouts(tmp_path):
    import safetensors.numpy

    ckpt = fixtures.make_checkpoint(TINY, 5)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    converters.save(ckpt, a, format="flax")
    converters.save(converters.load(a), b, format="flax")
    assert a.read_bytes() == b.read_bytes()
    stored = safetensors.numpy.load_file(str(a))  # the peer reader
    dims = ckpt.config.dims
    assert stored["stem.conv.kernel"].shape == (4, 4, 3, dims[0])
    assert stored["stages.1.downsample.conv.kernel"].shape == (2, 2, dims[0], dims[1])
    assert stored["stages.0.blocks.0.dwconv.kernel"].shape == (7, 7, 1, dims[0])
    assert stored["stages.0.blocks.0.pwconv1.kernel"].shape == (dims[0], 4 * dims[0])
    assert stored["head.fc.kernel"].shape == (dims[-1], 1000)
    # Element [kh, kw, in, out] of a Flax kernel is element [out, in, kh, kw] of the PyTorch one.
    assert stored["stem.conv.kernel"][1, 2, 0, 3] == ckpt.tensors["stem.conv.weight"][3, 0, 1, 2]
    assert stored["stem.norm.scale"].tolist() == ckpt.tensors["stem.norm.weight"].tolist()
    with pytest.raises(BadInputError, match="already exists"):
        converters.save(ckpt, a, format="flax")
    assert not list(tmp_path.glob("*.partial"))


# Run with a path argument in a process where importing convnextv2 fails, as on a machine without it.
_PLAIN_LOADER = textwrap.dedent("""
    import importlib.abc, json, sys

    class RefuseToolkit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "convnextv2":
                raise ImportError("convnextv2 is not installed here")
            return None

    sys.meta_path.insert(0, RefuseToolkit())
    import numpy as np
    from flax import nnx
    {snippet}
    state, config = load_flax_state(sys.argv[1])
    flat = nnx.to_flat_state(state)
    np.savez(sys.argv[2], **{{json.dumps(list(path)): np.asarray(value) for path, value in flat}})
    print(json.dumps({{"config": config, "toolkit_imported": any(m.startswith("convnextv2") for m in sys.modules)}}))
""")


def _doc_snippet() -> str:
    """The loader shown to users in docs/flax.md, so the doc cannot drift from what is tested."""
    doc = (REPO_ROOT / "docs" / "flax.md").read_text()
    section = doc.split("### Loading without this package", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_flax_file_loads_with_plain_flax_and_safetensors(tmp_path):
    from flax import nnx

    ckpt = _checkpoint(TINY, seed=6, num_classes=12)
    path = tmp_path / "model.safetensors"
    converters.save(ckpt, path, format="flax")
    script = tmp_path / "plain_load.py"
    script.write_text(_PLAIN_LOADER.format(snippet=textwrap.dedent(_doc_snippet())))
    proc = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "state.npz")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["toolkit_imported"] is False
    assert report["config"]["num_classes"] == 12 and report["config"]["dims"] == list(ckpt.config.dims)
    loaded = {tuple(json.loads(k)): v for k, v in np.load(tmp_path / "state.npz").items()}
    model = reference.build(ckpt, "flax")
    expected = {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(loaded) == set(expected)  # same paths, list indices as ints
    assert_same_tensors({str(k): v for k, v in loaded.items()}, {str(k): v for k, v in expected.items()})
    # The state drops into a model built from other weights and gives the original model's numbers.
    other = reference.build(_checkpoint(TINY, seed=9, num_classes=12), "flax")
    nnx.update(other, nnx.State.from_flat_path(loaded))
    images = seeded_images(2, 64)
    assert np.array_equal(reference.run_features(other, "flax", images)["logits"],
                          reference.run_features(model, "flax", images)["logits"])


@pytest.mark.parametrize("separator,head", [(".", "headed"), ("/", "headless")])
def test_a_users_own_nnx_state_without_metadata_is_read(tmp_path, separator, head):
    import safetensors.flax
    from flax import nnx

    ckpt = _checkpoint(TINY, seed=8, num_classes=6 if head == "headed" else 0, head_norm=head == "headed")
    model = reference.build(ckpt, "flax")
    flat = {separator.join(map(str, path)): var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    path = tmp_path / "mine.safetensors"
    safetensors.flax.save_file(flat, str(path))  # the peer writer, no metadata of ours
    assert converters.detect_format(path) == "flax"
    loaded = converters.load(path)
    assert loaded.config == ckpt.config
    assert loaded.source.format == "flax"
    assert_same_tensors(loaded.model_tensors(), ckpt.model_tensors())


def test_sniff_claims_only_flax_files(tmp_path):
    import safetensors.numpy

    vector = np.zeros(8, np.float32)
    timm_like = {"stem.0.weight": np.zeros((8, 3, 4, 4), np.float32), "stem.1.weight": vector,
                 "stages.0.blocks.0.conv_dw.weight": np.zeros((8, 1, 7, 7), np.float32)}
    hf_like = {"convnextv2.embeddings.patch_embeddings.weight": np.zeros((8, 3, 4, 4), np.float32),
               "convnextv2.encoder.stages.0.layers.0.dwconv.weight": np.zeros((8, 1, 7, 7), np.float32)}
    for name, tensors in [("timm", timm_like), ("hf", hf_like)]:
        safetensors.numpy.save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        assert not flax_format.sniff(tmp_path / f"{name}.safetensors")
    canonical = _canonical_file(tmp_path, "canonical")
    assert not flax_format.sniff(canonical)
    assert converters.detect_format(canonical) == "canonical"
    original = tmp_path / "original.pt"
    fixtures.write_fixture(original, TINY, "original", seed=0)
    assert not flax_format.sniff(original)
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not")
    assert not flax_format.sniff(tmp_path / "junk.safetensors")
    assert not flax_format.sniff(tmp_path)
    ours = tmp_path / "ours.safetensors"
    converters.save(converters.load(canonical), ours, format="flax")
    assert flax_format.sniff(ours)
    with pytest.raises(BadInputError, match="not a Flax NNX state|canonical file"):
        flax_format.read(canonical)


def _rewrite_with(path: Path, key: str, array: np.ndarray, keep_metadata: bool, name: str = "bad") -> Path:
    from convnextv2.converters.safetensors_io import read_safetensors, write_safetensors

    tensors, meta = read_safetensors(path)
    tensors = {k: (array if k == key else np.array(v)) for k, v in tensors.items()}
    bad = path.with_name(f"{name}-{keep_metadata}.safetensors")
    write_safetensors(bad, tensors, meta if keep_metadata else None)
    return bad


@pytest.mark.parametrize("keep_metadata", [True, False])
def test_wrong_shaped_tensor_is_named_with_expected_and_found_shape(tmp_path, keep_metadata):
    good = tmp_path / "good.safetensors"
    converters.save(_checkpoint(TINY, seed=1), good, format="flax")
    key = "stages.2.blocks.1.pwconv1.kernel"
    bad = _rewrite_with(good, key, np.zeros((32, 129), np.float32), keep_metadata)
    with pytest.raises(BadInputError) as info:
        converters.load(bad)
    assert f"tensor {key}: expected shape [32, 128], found [32, 129]" in str(info.value)
    assert str(bad) in str(info.value)
    flat_kernel = _rewrite_with(good, "stem.conv.kernel", np.zeros((48, 8), np.float32), keep_metadata, "rank")
    with pytest.raises(BadInputError) as info:
        converters.load(flat_kernel, format="flax")
    if keep_metadata:
        assert "tensor stem.conv.kernel: expected shape [4, 4, 3, 8], found [48, 8]" in str(info.value)
    else:  # nothing left to size the model from: the message says which tensor and what it should be
        assert "stem.conv.kernel, a (4, 4, 3, C0) kernel, found stem.conv.kernel with shape [48, 8]" in str(info.value)
    proc = run_cli("inspect", str(bad))
    assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_keys_are_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    converters.save(_checkpoint(TINY, seed=1), good, format="flax")
    from convnextv2.converters.safetensors_io import read_safetensors, write_safetensors

    tensors, meta = read_safetensors(good)
    tensors["stages.0.blocks.0.layer_scale.gamma"] = np.zeros(8, np.float32)
    write_safetensors(tmp_path / "odd.safetensors", dict(tensors), meta)
    with pytest.raises(BadInputError, match=r"stages\.0\.blocks\.0\.layer_scale\.gamma \[8\]"):
        converters.load(tmp_path / "odd.safetensors")


# ------------------------------------------------------------ CLI and import isolation

def test_cli_converts_to_and_from_flax(tmp_path):
    source = tmp_path / "convnextv2_atto_1k_224.pt"
    fixtures.write_fixture(source, "atto", "original", seed=2)
    flax_file, back = tmp_path / "atto-flax.safetensors", tmp_path / "back.pt"
    proc = run_cli("convert", str(source), "-o", str(flax_file), "--to", "flax")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("convert", str(flax_file), "-o", str(back), "--to", "original")
    assert proc.returncode == 0, proc.stderr
    from convnextv2.parity_tests.conftest_helpers import original_state

    assert_same_tensors(original_state(source), original_state(back))
    assert run_cli("convert", str(source), "-o", str(flax_file), "--to", "flax").returncode == 2
    proc = run_cli("inspect", str(flax_file), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["variant"] == "atto"


_MODULES_AFTER = textwrap.dedent("""
    import json, sys
    {body}
    print(json.dumps(sorted(m for m in ("torch", "tensorflow", "keras", "jax", "flax") if m in sys.modules)))
""")


def _imported_frameworks(body: str, cwd: Path) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _MODULES_AFTER.format(body=body)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env={**__import__("os").environ, "CONVNEXTV2_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_flax_reference_imports_neither_tensorflow_nor_torch(tmp_path):
    imported = _imported_frameworks("import convnextv2.reference.flax_model", tmp_path)
    assert "jax" in imported and "flax" in imported
    assert "torch" not in imported and "tensorflow" not in imported and "keras" not in imported


def test_convert_to_and_from_flax_imports_no_framework(tmp_path):
    canonical = _canonical_file(tmp_path, "original")
    body = textwrap.dedent(f"""
        from convnextv2.converters.cli import main
        for args in (["convert", {str(canonical)!r}, "-o", {str(tmp_path / "f.safetensors")!r}, "--to", "flax"],
                     ["convert", {str(tmp_path / "f.safetensors")!r}, "-o", {str(tmp_path / "c.safetensors")!r},
                      "--to", "canonical", "--from", "flax"]):
            try:
                main(args, standalone_mode=True)
            except SystemExit as exc:
                assert exc.code in (0, None), exc.code
    """)
    imported = _imported_frameworks(body, tmp_path)
    # The Flax file format is numpy-only by design, so not even JAX is needed to convert.
    assert imported == [], imported
    assert (tmp_path / "c.safetensors").read_bytes() == canonical.read_bytes()


# ------------------------------------------------------------ the every-size figures (script, not a test)

def _timed(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def timing_table(variants: tuple[str, ...] = ("atto", "tiny"), batches: tuple[int, ...] = (1, 8),
                 size: int = 224) -> list[dict[str, Any]]:
    """Median wall time of ``reference.run_features`` (numpy in, every feature out) on both frameworks."""
    rows = []
    for variant in variants:
        ckpt = fixtures.make_checkpoint(variant, seed=1)
        models = {"flax": reference.build(ckpt, "flax"), "torch": reference.build(ckpt, "torch")}
        for batch in batches:
            images = seeded_images(batch, size)
            start = time.perf_counter()
            reference.run_features(models["flax"], "flax", images)  # jit warm-up (compilation)
            first = time.perf_counter() - start
            reference.run_features(models["torch"], "torch", images)
            times: dict[str, list[float]] = {name: [] for name in models}
            # Interleaved, so load from other processes falls on both frameworks alike.
            for _ in range(10 if variant == "atto" else 5):
                for name, model in models.items():
                    times[name].append(_timed(lambda m=model, f=name, x=images: reference.run_features(m, f, x), 1))
            row: dict[str, Any] = {"variant": variant, "batch": batch, "flax_first_call_s": first}
            row.update({f"{name}_ms": 1e3 * float(np.median(t)) for name, t in times.items()})
            rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    """Args: none (every size, then timings), ``--timing`` (timings only) or sizes like ``tiny@384``."""
    cases = [(v, 224) for v in VARIANTS] + [("tiny", 384), ("base", 384)]
    if argv == ["--timing"]:
        cases = []
    elif argv:
        cases = [(v, int(s)) for v, s in (a.split("@") for a in argv)]
    print("| size | res | feature | flax fp32 err | torch fp32 err | ratio | flax fp64 err |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for variant, size in cases:
        ckpt = fixtures.make_checkpoint(variant, seed=1)
        result = measure(ckpt, seeded_images(4 if variant != "huge" else 2, size, seed=2))
        for name, errors in result["features"].items():
            ratio = errors["flax32"] / errors["torch32"] if errors["torch32"] else float("inf")
            worst = max(worst, ratio)
            print(f"| {variant} | {size} | {name} | {errors['flax32']:.2e} | {errors['torch32']:.2e} | "
                  f"{ratio:.2f} | {errors['flax64']:.1e} |", flush=True)
        print(f"| {variant} | {size} | top-1 identical | {result['top1']['flax32']} | {result['top1']['torch32']} "
              f"| | {result['top1']['flax64']} |", flush=True)
    if cases:
        print(f"worst ratio flax/torch float32: {worst:.2f}")
    print("\n| size | batch | flax run_features ms | torch run_features ms | flax first call (jit) s |")
    print("|---|---|---|---|---|")
    for row in timing_table():
        print(f"| {row['variant']} | {row['batch']} | {row['flax_ms']:.1f} | {row['torch_ms']:.1f} | "
              f"{row['flax_first_call_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
