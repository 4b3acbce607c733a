"""Determinism and round trips: every fixture through every format pair twice gives byte-identical
outputs, and the tensors come back bit for bit after every round trip.

Round trips cover the formats that are both readable and writable; a write-only format (a SavedModel: a
traced graph whose variables carry no names to map back) is never used as a source, and is checked for
byte-identical output only. The slow writers (tracing a model to ONNX, Keras, SavedModel) run under ``slow``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from convnextv2 import converters, fixtures

# executorch: XNNPACK lowering takes a minute per export on two cores.
# openvino, litert: each export is checked in its runtime against the float64 referee (a minute on two cores).
SLOW_FORMATS = {"onnx", "keras", "savedmodel", "executorch", "openvino", "litert"}
DIRECTORY_FORMATS = {"hf", "savedmodel"}
SUFFIX = {"canonical": ".safetensors", "original": ".pt", "timm": ".safetensors", "mmpretrain": ".pth",
          "flax": ".safetensors", "onnx": ".onnx", "keras": ".keras", "openvino": ".xml", "litert": ".tflite"}
FIXTURE_KINDS = ["canonical", "original", "fcmae", "fcmae-sparse"]


def _writable(name: str) -> bool:
    return hasattr(converters.format_module(name), "write")


def _param(fmt: str):
    return pytest.param(fmt, marks=[pytest.mark.slow] if fmt in SLOW_FORMATS else [], id=fmt)


FORMATS = [f for f in converters.available_formats() if converters.readable(f) and _writable(f)]
WRITE_ONLY = [f for f in converters.available_formats() if _writable(f) and not converters.readable(f)]


def _path(directory: Path, fmt: str, stem: str = "model") -> Path:
    return directory / (stem if fmt in DIRECTORY_FORMATS else stem + SUFFIX.get(fmt, ".bin"))


def _files(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    files = {path.name: path.read_bytes()}
    if path.suffix == ".xml" and path.with_suffix(".bin").exists():  # an OpenVINO IR's weights
        files[path.with_suffix(".bin").name] = path.with_suffix(".bin").read_bytes()
    sidecar = path.with_suffix(".json")
    if sidecar.exists() and sidecar != path:
        files[sidecar.name] = sidecar.read_bytes()
    return files


def _save_quietly(ckpt, path: Path, fmt: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. timm has no place for an FCMAE decoder and says so
        converters.save(ckpt, path, format=fmt)


def _assert_bit_exact(expected: dict[str, np.ndarray], ckpt, where: str) -> None:
    got = ckpt.model_tensors()
    assert list(got) == list(expected), f"{where}: tensor names differ: {set(got) ^ set(expected)}"
    for name, array in expected.items():
        other = np.asarray(got[name])
        assert other.dtype == array.dtype and other.shape == array.shape, f"{where}: {name} {other.dtype}{other.shape}"
        same_bits = np.array_equal(np.ascontiguousarray(other).view(np.uint8), array.view(np.uint8))
        assert same_bits, f"{where}: {name} differs"


def _source(tmp_path: Path, kind: str) -> tuple[Path, dict[str, np.ndarray]]:
    src = tmp_path / ("src.safetensors" if kind == "canonical" else "src.pt")
    expected = fixtures.write_fixture(src, "atto", kind, seed=5).model_tensors()
    return src, {k: np.ascontiguousarray(v) for k, v in expected.items()}


@pytest.mark.parametrize("kind", FIXTURE_KINDS)
@pytest.mark.parametrize("target", [_param(f) for f in FORMATS + WRITE_ONLY])
def test_every_fixture_to_every_format_twice_is_identical_and_exact(tmp_path, kind, target):
    src, expected = _source(tmp_path, kind)
    ckpt = converters.load(src)
    first, second = _path(tmp_path / "a", target), _path(tmp_path / "b", target)
    first.parent.mkdir()
    second.parent.mkdir()
    _save_quietly(ckpt, first, target)
    _save_quietly(converters.load(src), second, target)
    assert _files(first) == _files(second), f"{kind} -> {target}: two conversions differ"
    if target in WRITE_ONLY:
        # Nothing to read the tensors back with; the export's outputs are checked against the reference
        # where it is run (test_keras.py for the SavedModel).
        return
    _assert_bit_exact(expected, converters.load(first, format=target), f"{kind} -> {target}")


@pytest.mark.parametrize(("a", "b"), [
    pytest.param(a, b, marks=[pytest.mark.slow] if {a, b} & SLOW_FORMATS else [], id=f"{a}-{b}")
    for a, b in itertools.product(FORMATS, FORMATS)
])
def test_format_pairs_round_trip_bit_exact(tmp_path, a, b):
    """canonical -> a -> b -> a: tensors bit-exact at each step; a -> b twice byte-identical."""
    src, expected = _source(tmp_path, "canonical")
    in_a = _path(tmp_path, a, "in-a")
    _save_quietly(converters.load(src), in_a, a)
    ckpt_a = converters.load(in_a, format=a)
    _assert_bit_exact(expected, ckpt_a, f"canonical -> {a}")
    to_b = [_path(tmp_path / f"run{i}", b, "to-b") for i in (1, 2)]
    for path in to_b:
        path.parent.mkdir()
        _save_quietly(converters.load(in_a, format=a), path, b)
    assert _files(to_b[0]) == _files(to_b[1]), f"{a} -> {b}: two conversions differ"
    ckpt_b = converters.load(to_b[0], format=b)
    _assert_bit_exact(expected, ckpt_b, f"{a} -> {b}")
    back = _path(tmp_path, a, "back")
    _save_quietly(ckpt_b, back, a)
    _assert_bit_exact(expected, converters.load(back, format=a), f"{a} -> {b} -> {a}")
    assert ckpt_b.config == ckpt_a.config.with_(head_norm_eps=ckpt_b.config.head_norm_eps)


def test_outputs_do_not_depend_on_the_process(tmp_path):
    """Another process with another hash seed writes the same bytes (no set/dict-order or time leaks)."""
    fast = [f for f in FORMATS if f not in SLOW_FORMATS]
    src, _ = _source(tmp_path, "fcmae-sparse")
    script = (
        "import sys, warnings\nfrom pathlib import Path\nfrom convnextv2 import converters\n"
        "warnings.simplefilter('ignore')\n"
        "src, out = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "for spec in sys.argv[3:]:\n"
        "    fmt, name = spec.split('=')\n"
        "    (out / fmt).mkdir()\n"
        "    converters.save(converters.load(src), out / fmt / name, format=fmt)\n"
    )
    specs = [f"{f}={_path(Path(), f).name}" for f in fast]
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"proc{seed}"
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "CONVNEXTV2_PROGRESS": "0"}
        done = subprocess.run([sys.executable, "-c", script, str(src), str(out), *specs], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append({f: hashlib.sha256(b"".join(_files(_path(out / f, f)).values())).hexdigest() for f in fast})
    assert outputs[0] == outputs[1]
