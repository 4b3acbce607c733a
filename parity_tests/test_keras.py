"""Keras 3 / TensorFlow: the reference against the float64 PyTorch referee, .keras and .weights.h5 files
in both directions, the SavedModel export run without this package, import isolation, bad inputs.

The parity bar is the project's one rule (convnextv2.reference.parity_rule; docs/parity.md): on every feature,
the Keras float32 error against the float64 PyTorch referee is within the tolerance derived from the PyTorch
float32 reference's error against the same referee, measured in the same run on the same images (scale-aware:
max |error| / max |referee|), with top-1 identical.

``python -m convnextv2.parity_tests.test_keras [sizes...]`` prints the every-size measurement table.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from convnextv2 import converters, reference
from convnextv2.fixtures import make_checkpoint, write_fixture
from convnextv2.parity_tests.conftest_helpers import assert_same_tensors, run_cli
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.parity_rule import seeded_images

pytestmark = pytest.mark.tf

SMALL = "custom:depths=1,1,2,1;dims=8,16,32,64"
FEATURES = ("stem", "stage1", "stage2", "stage3", "stage4", "pooled", "logits")
# One float32 ulp of the feature's scale: the bit-level agreement bar between two runs of the same Keras graph.
ULP32 = float(np.finfo(np.float32).eps)
scale_aware = parity_rule.scale_aware_error


def measure(ckpt, images: np.ndarray) -> dict[str, dict[str, float]]:
    """Per feature: Keras fp32, PyTorch fp32 and Keras fp64 scale-aware errors against the fp64 referee.
    Models are built one at a time and freed, so large sizes fit in memory."""
    referee = reference.run_features(reference.build(ckpt, "torch", dtype="float64"), "torch",
                                     images.astype(np.float64))
    gc.collect()
    torch32 = reference.run_features(reference.build(ckpt, "torch"), "torch", images)
    gc.collect()
    keras32 = reference.run_features(reference.build(ckpt, "tensorflow"), "tensorflow", images)
    gc.collect()
    keras64 = reference.run_features(reference.build(ckpt, "tensorflow", dtype="float64"), "tensorflow",
                                     images.astype(np.float64))
    gc.collect()
    assert set(keras32) == set(referee) == set(keras64), f"feature sets differ: {set(keras32) ^ set(referee)}"
    table = {}
    for name in referee:
        assert keras32[name].shape == referee[name].shape, name
        assert keras32[name].dtype == np.float32 and keras64[name].dtype == np.float64, name
        table[name] = {"keras": scale_aware(keras32[name], referee[name]),
                       "torch": scale_aware(torch32[name], referee[name]),
                       "keras64": scale_aware(keras64[name], referee[name])}
    if "logits" in referee:
        table["top1"] = {"keras": float(np.array_equal(keras32["logits"].argmax(1), referee["logits"].argmax(1))),
                         "torch": float(np.array_equal(torch32["logits"].argmax(1), referee["logits"].argmax(1)))}
    return table


def assert_parity(table: dict[str, dict[str, float]]) -> None:
    problems = []
    for name, row in table.items():
        if name == "top1":
            if row["keras"] != 1.0:
                problems.append("top-1 differs from the float64 referee")
            continue
        if row["keras"] > parity_rule.tolerance(row["torch"]):
            problems.append(f"{name}: Keras fp32 error {row['keras']:.2e} > the rule's tolerance "
                            f"{parity_rule.tolerance(row['torch']):.2e} (PyTorch fp32 {row['torch']:.2e})")
        if row["keras64"] > 1e-10:
            problems.append(f"{name}: Keras fp64 error {row['keras64']:.2e} > 1e-10")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ parity

@pytest.mark.torch
@pytest.mark.parametrize(("variant", "size", "num_classes", "head_norm"), [
    ("atto", 64, 1000, True),
    (SMALL, 96, 10, True),
    (SMALL, 64, 0, True),    # headless with the final norm (HF's ConvNextV2Model)
    (SMALL, 64, 0, False),   # FCMAE encoder: no final norm
])
def test_keras_matches_float64_referee(variant, size, num_classes, head_norm):
    ckpt = make_checkpoint(variant, seed=1, fmt="canonical" if head_norm else "fcmae", num_classes=num_classes)
    images = seeded_images(2, size, seed=3)
    table = measure(ckpt, images)
    assert ("logits" in table) == (num_classes > 0)
    assert_parity(table)


@pytest.mark.torch
def test_keras_non_square_input_and_batch_one():
    ckpt = make_checkpoint(SMALL, seed=2, fmt="canonical", num_classes=7)
    images = np.random.default_rng(5).standard_normal((1, 3, 64, 128), dtype=np.float32)
    referee = reference.run_features(reference.build(ckpt, "torch", dtype="float64"), "torch",
                                     images.astype(np.float64))
    model = reference.build(ckpt, "tensorflow", dtype="float64")
    keras64 = reference.run_features(model, "tensorflow", images.astype(np.float64))
    for name in referee:
        assert keras64[name].shape == referee[name].shape
        assert scale_aware(keras64[name], referee[name]) < 1e-10, name
    with pytest.raises(ValueError, match="divisible by 32"):
        reference.run_features(model, "tensorflow", images[:, :, :48])


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize(("variant", "size"), [
    *[(v, 224) for v in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")],
    ("tiny", 384), ("base", 384),
])
def test_keras_every_size(variant, size):
    ckpt = make_checkpoint(variant, seed=0, fmt="canonical")
    assert_parity(measure(ckpt, seeded_images(2, size, seed=0)))


def test_export_canonical_is_the_loaded_tensors():
    from convnextv2.reference import keras_model

    ckpt = make_checkpoint("atto", seed=4, fmt="canonical")
    exported = keras_model.export_canonical(reference.build(ckpt, "tensorflow"))
    assert_same_tensors(ckpt.model_tensors(), exported)
    assert list(exported) == list(ckpt.model_tensors())


# ------------------------------------------------------------------ files

def _metadata_survives(original, back) -> None:
    assert back.config == original.config
    assert back.preprocessing == original.preprocessing
    assert back.source == original.source
    assert back.info == original.info


@pytest.mark.parametrize("file_name", ["model.keras", "model.weights.h5"])
@pytest.mark.parametrize("fmt", ["canonical", "fcmae-sparse"])
def test_keras_files_round_trip_bit_exact(tmp_path, file_name, fmt):
    ckpt = make_checkpoint(SMALL, seed=5, fmt=fmt, num_classes=10)
    path = tmp_path / file_name
    converters.save(ckpt, path, format="keras")
    assert converters.detect_format(path) == "keras"
    back = converters.load(path)
    assert_same_tensors(dict(ckpt.tensors), dict(back.tensors))  # extras (FCMAE decoder) included
    _metadata_survives(ckpt, back)
    first = hashlib.sha256(path.read_bytes()).hexdigest()
    time.sleep(1.1)  # a second later: any timestamp in the file would show
    converters.save(ckpt, path, format="keras", overwrite=True)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first, "the same checkpoint gave different bytes"
    assert not [p for p in tmp_path.iterdir() if p.name != file_name], "temporary files left behind"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_keras_files_keep_the_dtype(tmp_path, dtype):
    import ml_dtypes

    ckpt = make_checkpoint(SMALL, seed=5, fmt="canonical", num_classes=3)
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    ckpt.tensors = {name: array.astype(target) for name, array in ckpt.tensors.items()}
    for file_name in ("m.keras", "m.weights.h5"):
        converters.save(ckpt, tmp_path / file_name, format="keras")
        assert_same_tensors(dict(ckpt.tensors), dict(converters.load(tmp_path / file_name).tensors))


def test_plain_keras_weights_file_is_read_from_shapes(tmp_path):
    """A weights file Keras wrote itself (no convnextv2 metadata) is sized from its shapes."""
    from convnextv2.reference import keras_model

    ckpt = make_checkpoint(SMALL, seed=13, fmt="canonical", num_classes=6)
    reference.build(ckpt, "tensorflow").save_weights(tmp_path / "plain.weights.h5")
    assert converters.detect_format(tmp_path / "plain.weights.h5") == "keras"
    back = converters.load(tmp_path / "plain.weights.h5", variant=SMALL)
    assert back.config == ckpt.config
    assert back.source.format == "keras" and back.source.layout["metadata"] == "none"
    assert_same_tensors(ckpt.model_tensors(), dict(back.tensors))
    with pytest.raises(BadInputError, match="--variant atto"):
        converters.load(tmp_path / "plain.weights.h5", variant="atto")
    assert keras_model.make_model(ckpt.config).count_params() == ckpt.parameter_count


def test_keras_itself_loads_our_files(tmp_path):
    """Keras (safe mode) reads the archive and the weights file to the same tensors and the same outputs."""
    import keras

    from convnextv2.reference import keras_model

    ckpt = make_checkpoint(SMALL, seed=6, fmt="canonical", num_classes=10)
    converters.save(ckpt, tmp_path / "m.keras", format="keras")
    converters.save(ckpt, tmp_path / "m.weights.h5", format="keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert_same_tensors(ckpt.model_tensors(), keras_model.export_canonical(loaded))
    fresh = keras_model.make_model(ckpt.config)
    fresh.load_weights(tmp_path / "m.weights.h5")
    assert_same_tensors(ckpt.model_tensors(), keras_model.export_canonical(fresh))
    images = seeded_images(2, 64, seed=1)
    ours = reference.run_features(reference.build(ckpt, "tensorflow"), "tensorflow", images)
    theirs = reference.run_features(loaded, "tensorflow", images)
    assert list(theirs) == list(ours) == list(FEATURES)
    for name in FEATURES:
        np.testing.assert_array_equal(theirs[name], ours[name], err_msg=name)


def _rewrite_weight(archive: Path, out: Path, layer_name: str, shape: tuple[int, ...]) -> None:
    """Copy a .keras archive with one layer's kernel replaced by zeros of another shape."""
    import h5py

    work = out.parent / "work.h5"
    with zipfile.ZipFile(archive) as src:
        work.write_bytes(src.read("model.weights.h5"))
        with h5py.File(work, "r+") as handle:
            for key in handle["layers"]:
                variables = handle["layers"][key].get("vars")
                if variables is not None and variables.attrs.get("name") == layer_name:
                    del variables["0"]
                    variables.create_dataset("0", data=np.zeros(shape, np.float32))
        with zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                data = work.read_bytes() if info.filename == "model.weights.h5" else src.read(info)
                dst.writestr(info.filename, data)


def test_wrong_shaped_weight_is_named(tmp_path):
    ckpt = make_checkpoint(SMALL, seed=8, fmt="canonical", num_classes=10)
    good = tmp_path / "good.keras"
    converters.save(ckpt, good, format="keras")
    bad = tmp_path / "bad.keras"
    _rewrite_weight(good, bad, "stages.2.blocks.1.pwconv1", (32, 127))
    with pytest.raises(BadInputError) as info:
        converters.load(bad)
    message = str(info.value)
    assert "stages.2.blocks.1.pwconv1.weight" in message
    assert "expected shape [32, 128], found [32, 127]" in message
    result = run_cli("inspect", str(bad))
    assert result.returncode == 2 and "stages.2.blocks.1.pwconv1.weight" in result.stderr


def test_damaged_and_foreign_files(tmp_path):
    ckpt = make_checkpoint(SMALL, seed=9, fmt="canonical", num_classes=3)
    good = tmp_path / "good.keras"
    converters.save(ckpt, good, format="keras")
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BadInputError):
        converters.load(truncated, format="keras")
    garbage_weights = tmp_path / "garbage.keras"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(garbage_weights, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, b"not hdf5" if info.filename == "model.weights.h5" else src.read(info))
    with pytest.raises(BadInputError, match="damaged or unreadable"):
        converters.load(garbage_weights)
    from convnextv2.converters import keras as keras_format

    canonical = tmp_path / "c.safetensors"
    converters.save(ckpt, canonical, format="canonical")
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Functional"}))
        archive.writestr("model.weights.h5", b"")
    for path in (canonical, other_zip, truncated, tmp_path):
        assert keras_format.sniff(path) is False, path
    assert converters.detect_format(canonical) == "canonical"


# ------------------------------------------------------------------ SavedModel

_SAVEDMODEL_RUNNER = textwrap.dedent("""
    import importlib.abc, json, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("convnextv2", "torch"):
                raise ImportError("this process must not import " + name)

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    import tensorflow as tf

    images = tf.constant(np.load(sys.argv[1]))
    report = []
    for export in sys.argv[2:]:
        serve = tf.saved_model.load(export).signatures["serving_default"]
        outputs = serve(pixel_values=images)
        name, = outputs
        np.save(export + ".npy", outputs[name].numpy())
        report.append({"output": name, "inputs": sorted(serve.structured_input_signature[1])})
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("convnextv2", "torch"))
    print(json.dumps({"exports": report, "leaked": leaked}))
""")


@pytest.mark.torch
def test_savedmodel_runs_without_this_package(tmp_path):
    """Headed and headless exports, NCHW input of a size the export never saw, in a process that cannot
    import this package or PyTorch."""
    checkpoints = {"logits": make_checkpoint(SMALL, seed=10, fmt="canonical", num_classes=10),
                   "pooled": make_checkpoint(SMALL, seed=10, fmt="fcmae")}
    exports = {name: tmp_path / f"saved-{name}" for name in checkpoints}
    for name, ckpt in checkpoints.items():
        converters.save(ckpt, exports[name], format="savedmodel")
    assert converters.detect_format(exports["logits"]) == "savedmodel"
    with pytest.raises(BadInputError, match="not supported"):
        converters.load(exports["logits"])
    images = np.random.default_rng(11).standard_normal((3, 3, 64, 96), dtype=np.float32)
    np.save(tmp_path / "x.npy", images)
    # -I: no user site, no PYTHONPATH; the refusing finder covers the editable install of this package.
    result = subprocess.run([sys.executable, "-I", "-c", _SAVEDMODEL_RUNNER, str(tmp_path / "x.npy"),
                             *map(str, exports.values())], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"exports": [{"output": name, "inputs": ["pixel_values"]} for name in exports], "leaked": []}
    for name, ckpt in checkpoints.items():
        served = np.load(f"{exports[name]}.npy")
        referee = reference.run_features(reference.build(ckpt, "torch", dtype="float64"), "torch",
                                         images.astype(np.float64))[name]
        torch32 = reference.run_features(reference.build(ckpt, "torch"), "torch", images)[name]
        assert served.shape == referee.shape and served.dtype == np.float32
        assert parity_rule.judge(name, served, referee, scale_aware(torch32, referee)).passed, name
        if name == "logits":
            np.testing.assert_array_equal(served.argmax(1), referee.argmax(1))
        ours = reference.run_features(reference.build(ckpt, "tensorflow"), "tensorflow", images)[name]
        np.testing.assert_allclose(served, ours, rtol=0, atol=4 * ULP32 * np.abs(ours).max())
    converters.save(checkpoints["logits"], exports["logits"], format="savedmodel", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


# ------------------------------------------------------------------ import isolation

_MODULES_AFTER = textwrap.dedent("""
    import sys
    {body}
    frameworks = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "jax", "flax"}})
    print("FRAMEWORKS=" + ",".join(frameworks))
""")


def _frameworks_after(body: str, cwd: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-c", _MODULES_AFTER.format(body=body)], capture_output=True,
                            text=True, timeout=600, cwd=cwd, env={**os.environ, "CONVNEXTV2_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("FRAMEWORKS=")][-1]
    return [x for x in line.split("=", 1)[1].split(",") if x]


def test_keras_reference_imports_neither_torch_nor_jax(tmp_path):
    assert _frameworks_after("import convnextv2.reference.keras_model", tmp_path) == []


def test_convert_to_and_from_keras_imports_neither_torch_nor_jax(tmp_path):
    write_fixture(tmp_path / "a.safetensors", SMALL, "canonical", seed=12, num_classes=4)
    body = textwrap.dedent("""
        from convnextv2.converters.cli import main
        for args, code in ((["convert", "a.safetensors", "-o", "a.keras", "--to", "keras"], 0),
                           (["convert", "a.keras", "-o", "b.safetensors", "--to", "canonical"], 0),
                           (["convert", "a.safetensors", "-o", "saved", "--to", "savedmodel"], 0),
                           (["convert", "a.safetensors", "-o", "a.keras", "--to", "keras"], 2)):
            try:
                main(args)
            except SystemExit as exc:
                assert exc.code == code, (args, exc.code)
    """)
    assert _frameworks_after(body, tmp_path) == []
    # canonical -> .keras -> canonical through the CLI reproduces the file byte for byte (metadata included)
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    assert (tmp_path / "saved" / "saved_model.pb").is_file()


# ------------------------------------------------------------------ the every-size table

def _timing(ckpt, batch: int, size: int, repeats: int = 5) -> tuple[float, float]:
    """Median seconds per forward at ``batch``: (Keras graph, PyTorch eager)."""
    import torch

    images = seeded_images(batch, size, seed=0)
    keras_model = reference.build(ckpt, "tensorflow")
    torch_model = reference.build(ckpt, "torch")
    reference.run_features(keras_model, "tensorflow", images)  # trace once
    keras_times, torch_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        reference.run_features(keras_model, "tensorflow", images)
        keras_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            torch_model(torch.from_numpy(images))
        torch_times.append(time.perf_counter() - start)
    return float(np.median(keras_times)), float(np.median(torch_times))


def main(argv: list[str]) -> None:
    runs = [(v, 224) for v in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")]
    runs += [("tiny", 384), ("base", 384)]
    if argv:
        runs = [(v, int(s)) for v, s in (a.split("@") for a in argv)]
    print("| size | px | logits: Keras fp32 | PyTorch fp32 | ratio | worst feature ratio | Keras fp64 | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, size in runs:
        table = measure(make_checkpoint(variant, seed=0, fmt="canonical"), seeded_images(2, size, seed=0))
        logits = table["logits"]
        worst = max((row["keras"] / max(row["torch"], ULP32), name) for name, row in table.items() if name != "top1")
        k64 = max(row["keras64"] for name, row in table.items() if name != "top1")
        print(f"| {variant} | {size} | {logits['keras']:.2e} | {logits['torch']:.2e} | "
              f"{logits['keras'] / logits['torch']:.2f} | {worst[0]:.2f} ({worst[1]}) | {k64:.1e} | "
              f"{'same' if table['top1']['keras'] == 1.0 else 'DIFFERENT'} |", flush=True)
    print()
    print("| size | batch | Keras graph (ms) | PyTorch eager (ms) |")
    print("|---|---|---|---|")
    for variant in ("atto", "tiny"):
        for batch in (1, 8):
            keras_s, torch_s = _timing(make_checkpoint(variant, seed=0, fmt="canonical"), batch, 224)
            print(f"| {variant} | {batch} | {keras_s * 1e3:.0f} | {torch_s * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
