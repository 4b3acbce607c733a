"""The parity matrix: sizes x runtimes x source formats, each case against the float64 PyTorch referee.

Two faces of the cube are run, which together cover every pair of the three dimensions:
- every size x every runtime, on weights read back from a canonical file;
- every readable source format x every runtime, at the first size of the mode.
Quick by default (atto and a custom tiny config at 64 px); ``--full-matrix`` (nox -s parity): the eight
released sizes at 224, tiny and base at 384, huge at 512. Each case carries its runtime's group marker
(torch, tf, flax, onnx, peers) so CI can run one group per job; ``--shard I/N`` slices further.

The referee is built from the in-memory fixture, never from the file under test, so a converter that
corrupts weights cannot hide by corrupting both sides. A runtime that is not available fails its cases
with the reason: every runtime here is declared in the ``all`` extra.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convnextv2 import converters
from convnextv2.fixtures import make_checkpoint
from convnextv2.parity_tests.harness import run_parity, torch_features
from convnextv2.reference.parity_rule import seeded_images

CUSTOM_TINY = "custom:depths=1,1,2,1;dims=8,16,32,64"
QUICK_SIZES = [("atto", 64), (CUSTOM_TINY, 64)]
FULL_SIZES = [(v, 224) for v in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")] + [
    ("tiny", 384), ("base", 384), ("huge", 512)]
# runtime -> the pytest marker of its framework group
RUNTIME_GROUPS = {
    "torch": "torch",
    "tensorflow": "tf",
    "flax": "flax",
    "onnxruntime": "onnx",
    "openvino": "openvino",
    "litert": "litert",
    "timm": "peers",
    "transformers-pt": "peers",
    "transformers-tf": "peers",
    "executorch": "executorch",
}
# Layouts the ``original`` reader understands, each a source format of its own in the matrix.
ORIGINAL_LAYOUTS = ("original", "fcmae", "fcmae-sparse")
# Every format the toolkit is meant to read; test_every_expected_format_is_readable holds the line.
EXPECTED_SOURCE_FORMATS = ("original", "fcmae", "fcmae-sparse", "canonical", "hf", "timm", "mmpretrain", "keras", "flax",
                           "onnx")
SUFFIX = {"original": ".pt", "fcmae": ".pt", "fcmae-sparse": ".pt", "canonical": ".safetensors", "hf": "",
          "timm": ".safetensors", "mmpretrain": ".pth", "keras": ".keras", "flax": ".safetensors", "onnx": ".onnx"}
SEED = 0
# Formats the toolkit writes but by design does not read back (a SavedModel is a traced graph without names).
WRITE_ONLY_FORMATS = ("savedmodel",)
# Runtimes that cost a fresh interpreter with TensorFlow, or a fresh export (OpenVINO, LiteRT), per case: in the
# quick matrix, one size only.
QUICK_ONE_SIZE = ("transformers-tf", "openvino", "litert")
# Runtimes whose every case lowers a fresh program (ExecuTorch: about a minute on two cores): quick matrix on atto only.
QUICK_ATTO_ONLY = ("executorch",)
# The precision axis (quick: atto at 64 px; --full-matrix: every size at 224): each runtime at each reduced precision.
REDUCED_DTYPES = ("bfloat16", "float16")


def readable_source_formats() -> list[str]:
    """Source formats whose reader is in this install (format modules may land separately)."""
    names: list[str] = []
    for name in converters.available_formats():
        if name in WRITE_ONLY_FORMATS or not converters.readable(name):
            continue
        names.extend(ORIGINAL_LAYOUTS if name == "original" else [name])
    return names


def _batch(size: int) -> int:
    # Large inputs on two CPU cores: one image keeps huge@512 inside the nox budget.
    return 2 if size <= 224 else 1


def _case_id(variant: str, size: int) -> str:
    return f"{'custom-tiny' if variant == CUSTOM_TINY else variant}-{size}"


# Independent implementations that miss the parity rule at a size, as measured: kept as strict expected
# failures rather than loosened, so a fixed peer turns the case red and our own runtimes never get this
# allowance. Empty since the rule became 6x the baseline (docs/parity.md): the one finding under the old 2x
# rule, transformers 4.57.6's TensorFlow ConvNextV2 at huge@512 (logits 2.7x the torch float32 error), is inside
# it with room to spare.
PEER_FINDINGS: dict[tuple[str, int, str], str] = {}


def pytest_generate_tests(metafunc: Any) -> None:
    full = metafunc.config.getoption("--full-matrix", default=False)
    sizes = FULL_SIZES if full else QUICK_SIZES
    if "size_case" in metafunc.fixturenames:
        params = []
        for runtime, group in RUNTIME_GROUPS.items():
            for variant, size in sizes:
                if not full and runtime in QUICK_ONE_SIZE and variant != CUSTOM_TINY:
                    continue
                if not full and runtime in QUICK_ATTO_ONLY and variant != "atto":
                    continue
                marks = [getattr(pytest.mark, group)]
                if variant in ("large", "huge") or size > 224 or (not full and runtime in QUICK_ATTO_ONLY):
                    # The quick ExecuTorch case is slow-marked too: test_executorch.py already lowers and runs atto
                    # in the default suite, and a second lowering would cost another minute of it.
                    marks.append(pytest.mark.slow)
                if variant == "huge":
                    marks.append(pytest.mark.xdist_group("huge"))  # one huge model in memory at a time
                if (variant, size, runtime) in PEER_FINDINGS:
                    marks.append(pytest.mark.xfail(strict=True, reason=PEER_FINDINGS[(variant, size, runtime)]))
                params.append(pytest.param((variant, size, runtime), marks=marks,
                                           id=f"{_case_id(variant, size)}-{runtime}"))
        metafunc.parametrize("size_case", params)
    if "dtype_case" in metafunc.fixturenames:
        params = []
        for runtime, group in RUNTIME_GROUPS.items():
            for dtype in REDUCED_DTYPES:
                for variant, size in (sizes[:1] if not full else [s for s in sizes if s[1] == 224]):
                    marks = [getattr(pytest.mark, group)]
                    if variant in ("large", "huge"):
                        marks.append(pytest.mark.slow)
                    params.append(pytest.param((variant, size, runtime, dtype), marks=marks,
                                               id=f"{_case_id(variant, size)}-{runtime}-{dtype}"))
        metafunc.parametrize("dtype_case", params)
    if "format_case" in metafunc.fixturenames:
        variant, size = sizes[0]
        params = []
        for fmt in readable_source_formats():
            if fmt == "canonical":
                continue  # the size face already reads every size back from canonical
            for runtime, group in RUNTIME_GROUPS.items():
                # Outside --full-matrix the format face runs on PyTorch only: it checks the readers, and
                # the runtimes are crossed with sizes above.
                if not full and runtime != "torch":
                    continue
                params.append(pytest.param((variant, size, fmt, runtime), marks=[getattr(pytest.mark, group)],
                                           id=f"{fmt}-{_case_id(variant, size)}-{runtime}"))
        metafunc.parametrize("format_case", params)


def _code_fingerprint() -> str:
    """What the cached referee depends on: the reference model, the fixture maker, the torch version."""
    import hashlib

    import torch

    from convnextv2.fixtures import make
    from convnextv2.reference import torch_model, variants

    digest = hashlib.sha256(torch.__version__.encode() + np.__version__.encode())
    for module in (torch_model, variants, make):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def _weights_kind(fmt: str) -> str:
    """The fixture whose tensors a format holds: every format holds the canonical fixture's tensors, except
    the headless FCMAE encoders."""
    return "fcmae" if fmt.startswith("fcmae") else "canonical"


def _torch_features(variant: str, size: int, fmt: str, dtype: str, cache_dir: str | None) -> dict[str, np.ndarray]:
    return _torch_features_of(variant, size, _weights_kind(fmt), dtype, cache_dir)


@functools.lru_cache(maxsize=4)
def _torch_features_of(variant: str, size: int, kind: str, dtype: str, cache_dir: str | None) -> dict[str, np.ndarray]:
    """Referee (float64) or baseline (float32) features of the in-memory fixture. Cached per worker, and on
    disk (pytest's cache directory) across the nox sessions of each framework group: at huge@512 the float64
    referee is most of a group's time."""
    cached = None
    if cache_dir is not None:
        key = f"{_case_id(variant, size)}-{kind}-{dtype}-b{_batch(size)}-s{SEED}-{_code_fingerprint()}.npz"
        cached = Path(cache_dir) / key.replace(":", "_").replace(";", "_").replace(",", "_").replace("=", "_")
        if cached.exists():
            with np.load(cached) as data:
                return {k: data[k] for k in data.files}
    features = torch_features(make_checkpoint(variant, SEED, kind), seeded_images(_batch(size), size, SEED), dtype)
    if cached is not None:
        partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial.npz")
        np.savez(partial, **features)  # type: ignore[arg-type]
        os.replace(partial, cached)  # atomic: a concurrent worker sees the whole file or none
    return features


@pytest.fixture(scope="session")
def referee_cache(request: pytest.FixtureRequest) -> str | None:
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    return str(cache.mkdir("convnextv2-parity-referee")) if cache is not None else None


@pytest.fixture(scope="session")
def parity_cache() -> Any:
    """The parity cache under $XDG_CACHE_HOME (conftest: this test process's own folder, or the one nox -s parity
    shares across its groups and workers): a size case's exports serve the precision and format cases of the
    same weights, which every format here reads back bit for bit (the key is the weights, not the file)."""
    from convnextv2.parity_tests.cache import ParityCache

    return ParityCache.default()


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory: pytest.TempPathFactory) -> Any:
    made: dict[tuple[str, str, int], Path] = {}
    root = tmp_path_factory.mktemp("matrix-fixtures")

    def get(variant: str, fmt: str, size: int) -> Path:
        key = (variant, fmt, size)
        if key not in made:
            path = root / f"{_case_id(variant, size)}-{fmt}{SUFFIX.get(fmt, '.bin')}"
            ckpt = make_checkpoint(variant, SEED, fmt)
            if fmt in ORIGINAL_LAYOUTS:
                converters.save(ckpt, path, format="original", layout="finetuned" if fmt == "original" else fmt)
            elif fmt == "onnx":
                # The ONNX export is gated by onnxruntime at its own image size: the matrix's, not 224.
                converters.save(ckpt, path, format="onnx", size=size)
            else:
                converters.save(ckpt, path, format=fmt)
            made[key] = path
        return made[key]

    return get


def _fixture_config(variant: str, fmt: str) -> Any:
    """The config make_checkpoint gives a format, without making its tensors (2.6 GB at huge)."""
    from convnextv2.reference.variants import config_for

    if fmt.startswith("fcmae"):
        return config_for(variant, num_classes=0, head_norm=False)
    return config_for(variant, num_classes=1000)


def _record(record_property: Any, report: Any, referee_seconds: float) -> None:
    """Where the case's seconds went, for --parity-timings (benchmarks/parity_matrix.py)."""
    from convnextv2.parity_tests.plugin import TIMINGS_PROPERTY

    phases: dict[str, float] = {"referee": referee_seconds}
    for row in report.runtimes:
        for name, seconds in row.phases.items():
            phases[name] = phases.get(name, 0.0) + seconds
        phases["runtime total"] = phases.get("runtime total", 0.0) + row.seconds
    artifacts = [f"{kind} {state}" for row in report.runtimes for kind, state in row.artifacts.items()]
    record_property(TIMINGS_PROPERTY, {"phases": phases, "artifacts": artifacts})


def _check(ckpt: Any, variant: str, size: int, fmt: str, runtime: str, cache_dir: str | None,
           record_property: Any, cache: Any) -> None:
    expected = _fixture_config(variant, fmt)
    assert ckpt.config == expected, f"read back as {ckpt.config}, written as {expected}"
    started = time.perf_counter()
    referee = _torch_features(variant, size, fmt, "float64", cache_dir)
    baseline = _torch_features(variant, size, fmt, "float32", cache_dir)
    referee_seconds = time.perf_counter() - started
    report = run_parity(
        ckpt, [runtime], images=seeded_images(_batch(size), size, SEED),
        referee_source="the in-memory fixture the file was written from",
        referee_features=referee, baseline_features=baseline, cache=cache)
    _record(record_property, report, referee_seconds)
    result = report.result(runtime)
    assert result.status != "unavailable", result.reason  # declared in the extras: missing is a failure
    assert result.status == "pass", (
        f"{runtime}: {result.status} {result.reason} first diverges at {result.first_divergence}: "
        + "; ".join(f"{f.name} {f.message}" for f in result.features if f.status == "fail"))
    compared = [f.name for f in result.features if f.status == "pass"]
    assert "stage4" in compared, f"{runtime} compared only {compared}"
    assert ("logits" in compared) == (expected.num_classes > 0), f"{runtime} compared only {compared}"


def test_size_case(size_case: tuple[str, int, str], fixture_files: Any, referee_cache: str | None,
                   record_property: Any, parity_cache: Any) -> None:
    variant, size, runtime = size_case
    ckpt = converters.load(fixture_files(variant, "canonical", size), format="canonical")
    _check(ckpt, variant, size, "canonical", runtime, referee_cache, record_property, parity_cache)


def test_format_case(format_case: tuple[str, int, str, str], fixture_files: Any, referee_cache: str | None,
                     record_property: Any, parity_cache: Any) -> None:
    variant, size, fmt, runtime = format_case
    path = fixture_files(variant, fmt, size)
    assert converters.detect_format(path) == ("original" if fmt in ORIGINAL_LAYOUTS else fmt)
    _check(converters.load(path), variant, size, fmt, runtime, referee_cache, record_property, parity_cache)


def test_dtype_case(dtype_case: tuple[str, int, str, str], fixture_files: Any, referee_cache: str | None,
                    record_property: Any, parity_cache: Any) -> None:
    """A runtime that runs a reduced precision passes the rule for that precision (its yardstick: the PyTorch
    reference at that precision, norms in float32); one that cannot is reported "not available at" it, never
    failed and never silently dropped."""
    from convnextv2.parity_tests import runtimes

    variant, size, runtime, dtype = dtype_case
    ckpt = converters.load(fixture_files(variant, "canonical", size), format="canonical")
    started = time.perf_counter()
    referee = _torch_features(variant, size, "canonical", "float64", referee_cache)
    baseline = _torch_features(variant, size, "canonical", "float32", referee_cache)
    referee_seconds = time.perf_counter() - started
    report = run_parity(
        ckpt, [runtime], dtypes=[dtype], images=seeded_images(_batch(size), size, SEED),
        referee_source="the in-memory fixture the file was written from",
        referee_features=referee, baseline_features=baseline, cache=parity_cache)
    _record(record_property, report, referee_seconds)
    result = report.result(runtime, dtype)
    if dtype not in runtimes.get(runtime).dtypes:
        assert result.status == "unavailable" and f"not available at {dtype}" in result.reason, result.reason
        return
    if result.status == "unavailable" and f"not available at {dtype} here" in result.reason:
        # The runtime read back that this machine's hardware cannot run the precision (OpenVINO's CPU plugin
        # without bfloat16 units): listed, never judged at the wrong precision. Shown as a skip with that reason,
        # so a run on such a machine says what it could not cover; a missing package still fails.
        pytest.skip(result.reason)
    assert result.status != "unavailable", result.reason  # declared in the extras: missing is a failure
    assert result.status == "pass", (
        f"{runtime} ({dtype}): {result.status} {result.reason} first diverges at {result.first_divergence}: "
        + "; ".join(f"{f.name} {f.message}" for f in result.features if f.status == "fail"))
    assert "stage4" in [f.name for f in result.features if f.status == "pass"]


@pytest.mark.torch
def test_every_expected_format_is_readable() -> None:
    """No silent skips: a format the toolkit promises but cannot read here fails this test by name."""
    missing = sorted(set(EXPECTED_SOURCE_FORMATS) - set(readable_source_formats()))
    assert not missing, f"source formats without a reader in this install: {missing}"


@pytest.mark.torch
def test_matrix_dimensions() -> None:
    """The full matrix covers what the released checkpoints need: all eight sizes at 224, tiny/base at 384, huge at 512."""
    from convnextv2.reference.variants import VARIANTS

    assert {v for v, s in FULL_SIZES if s == 224} == set(VARIANTS)
    assert {(v, s) for v, s in FULL_SIZES if s != 224} == {("tiny", 384), ("base", 384), ("huge", 512)}
    from convnextv2.parity_tests import runtimes

    assert set(RUNTIME_GROUPS) == set(runtimes.RUNTIMES)
    from convnextv2.parity_tests.plugin import PARITY_GROUPS

    assert set(PARITY_GROUPS) == set(RUNTIME_GROUPS.values())  # what --parity-timings files each case under
    noxfile = Path(__file__).resolve().parent.parent / "noxfile.py"
    if noxfile.is_file():  # a repository checkout: its nox parity sessions are these groups
        import ast

        tree = ast.parse(noxfile.read_text(encoding="utf-8"))
        listed = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                      and any(getattr(t, "id", "") == "PARITY_GROUPS" for t in node.targets))
        assert list(listed) == list(PARITY_GROUPS)
    for fmt in EXPECTED_SOURCE_FORMATS:
        assert _fixture_config(CUSTOM_TINY, fmt) == make_checkpoint(CUSTOM_TINY, SEED, fmt).config, fmt
