"""Export templates (converters/templates.py, converters/weight_map.py): an export built once per architecture from
the probe checkpoint, a checkpoint's weights written into it and proven before any runtime runs it.

The oracle is each runtime itself: an export built for checkpoint A and given B's weights is run by its runtime and
judged against B's float64 referee by the parity rule; a fresh export of B (the exporter itself) is what convert's
templated output must equal byte for byte.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from convnextv2.converters import templates, weight_map
from convnextv2.converters.entry_cache import EntryCache
from convnextv2.fixtures import make_checkpoint
from convnextv2.parity_tests.cache import ParityCache
from convnextv2.parity_tests.harness import run_parity
from convnextv2.reference.errors import CheckFailedError

RUNTIMES = {"onnxruntime": ("onnxruntime", "onnxscript"), "openvino": ("openvino", "onnxscript"),
            "litert": ("tensorflow",), "executorch": ("executorch",)}
KIND = {"onnxruntime": "onnx", "openvino": "openvino", "litert": "litert", "executorch": "executorch"}


def _needs(runtime: str) -> None:
    for module in RUNTIMES[runtime]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino",
                                     pytest.param("litert", marks=pytest.mark.slow),
                                     pytest.param("executorch", marks=pytest.mark.slow)])
def test_an_export_built_for_a_given_b_weights_is_judged_against_b_and_passes(tmp_path, runtime):
    _needs(runtime)
    cache_root = tmp_path / "cache"
    first = run_parity(make_checkpoint("atto", seed=1), [runtime], image_size=64, batch=2,
                       cache=ParityCache(cache_root))
    assert first.passed, first.result(runtime).reason
    cache = ParityCache(cache_root)
    b = make_checkpoint("atto", seed=2)
    second = run_parity(b, [runtime], image_size=64, batch=2, cache=cache)
    result = second.result(runtime)
    assert result.passed, result.reason
    assert result.artifacts[KIND[runtime]] == templates.TEMPLATE  # B's export came from A's template
    assert f"template-{KIND[runtime]}" in cache.hits and KIND[runtime] in cache.misses
    # A and B differ in every tensor, so passing B's referee needs B's weights in the export.
    a_tensors = make_checkpoint("atto", seed=1).model_tensors()
    assert all(not np.array_equal(a_tensors[name], value) for name, value in b.model_tensors().items()
               if np.ptp(value) > 0)


@pytest.mark.onnx
def test_a_transposed_tensor_is_caught_before_any_runtime_runs_it(tmp_path, monkeypatch):
    _needs("onnxruntime")
    cache_root = tmp_path / "cache"
    run_parity(make_checkpoint("atto", seed=1), ["onnxruntime"], image_size=64, batch=2,
               cache=ParityCache(cache_root))
    real = weight_map.substitute
    target = "stages.0.blocks.0.pwconv1.weight"

    def transposing(files, wmap, ckpt, words=None):
        # A substitution bug: one linear weight written as stored, not transposed as the graph keeps it.
        tensors = dict(ckpt.tensors)
        tensors[target] = np.ascontiguousarray(tensors[target].T).reshape(tensors[target].shape)
        wrong = make_checkpoint("atto", seed=2)
        wrong.tensors = tensors
        real(files, wmap, wrong)

    monkeypatch.setattr(templates, "write_weights", transposing)
    from convnextv2.converters.onnx import session

    monkeypatch.setattr(session, "ort_session", lambda *a, **k: pytest.fail("a runtime ran the wrong export"))
    report = run_parity(make_checkpoint("atto", seed=2), ["onnxruntime"], image_size=64, batch=2,
                        cache=ParityCache(cache_root))
    result = report.result("onnxruntime")
    assert not result.passed
    assert "weights substituted wrongly, caught before any runtime ran it" in result.reason
    assert target in result.reason and "transposed (1, 0)" in result.reason


def test_the_proof_names_the_tensor_and_the_mismatch(tmp_path):
    """The proof alone, on a hand-made map: the oracle is numpy's own transpose."""
    ckpt = make_checkpoint("atto", seed=3)
    probe = weight_map.probe_checkpoint(ckpt)
    # A "format" storing every tensor transposed (reversed axes), one after another.
    data = b"".join(np.ascontiguousarray(v.T).tobytes() for v in probe.model_tensors().values())
    ranges, offset = [], 0
    for v in probe.model_tensors().values():
        ranges.append(("f", offset, v.nbytes))
        offset += v.nbytes
    wmap = weight_map.establish(probe, {"f": data}, ranges)
    files = {"f": bytearray(data)}
    weight_map.substitute(files, wmap, ckpt)
    expected = b"".join(np.ascontiguousarray(np.asarray(v, np.float32).T).tobytes()
                        for v in ckpt.model_tensors().values())
    assert bytes(files["f"]) == expected
    weight_map.prove(files, wmap, ckpt, "test")
    name = "stages.1.blocks.0.dwconv.weight"
    k = wmap.tensors.index(name)
    start = int(sum(int(np.prod(s)) for s in wmap.shapes[:k])) * 4
    wrong = np.asarray(ckpt.tensors[name], np.float32)
    files["f"][start:start + wrong.nbytes] = wrong.tobytes()  # as stored, not transposed
    with pytest.raises(CheckFailedError, match=rf"{name} transposed \([0-9, ]+\), but \d+ of \d+ elements differ"):
        weight_map.prove(files, wmap, ckpt, "test")


def test_a_constant_computed_from_the_weights_refuses_the_template():
    probe = weight_map.probe_checkpoint(make_checkpoint("atto"))
    tensors = list(probe.model_tensors().values())
    folded = (tensors[0] * np.float32(2)).tobytes()  # a product, as a folding converter would store
    data = b"".join(v.tobytes() for v in tensors) + folded
    ranges = [("f", 0, len(data))]
    with pytest.raises(weight_map.NotSubstitutable, match="computed from the weights"):
        weight_map.establish(probe, {"f": data}, ranges)
    missing = b"".join(v.tobytes() for v in tensors[1:])
    with pytest.raises(weight_map.NotSubstitutable, match="is not stored as a copy"):
        weight_map.establish(probe, {"f": missing}, [("f", 0, len(missing))])


@pytest.mark.onnx
def test_convert_of_a_second_checkpoint_reuses_the_template_and_equals_a_fresh_build(tmp_path):
    _needs("onnxruntime")
    from convnextv2.converters.onnx import export

    cache = EntryCache(tmp_path / "cache")
    assert export.write_with(make_checkpoint("atto", seed=1), tmp_path / "a.onnx", cache, size=64) == templates.TEMPLATE
    b = make_checkpoint("atto", seed=2)
    assert export.write_with(b, tmp_path / "b.onnx", cache, size=64) == templates.TEMPLATE
    assert cache.hits == ["template-onnx"]
    export.write(b, tmp_path / "fresh.onnx", size=64)
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "fresh.onnx").read_bytes()
    # --no-cache: nothing kept, built afresh and said so.
    nothing = EntryCache(None)
    assert export.write_with(b, tmp_path / "c.onnx", nothing, size=64).startswith("built afresh: no persistent")
    assert (tmp_path / "c.onnx").read_bytes() == (tmp_path / "fresh.onnx").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("litert", ".tflite"), ("openvino", ".xml")])
def test_convert_of_a_second_checkpoint_uses_the_template_and_writes_the_fresh_file(tmp_path, fmt, suffix):
    """The command a user runs: the second checkpoint's export comes from the first's template (its JSON says
    so) and is the file ``--no-cache`` (a fresh build) writes, byte for byte."""
    import json

    from convnextv2.fixtures import write_fixture
    from convnextv2.parity_tests.conftest_helpers import run_cli

    _needs({"onnx": "onnxruntime", "litert": "litert", "openvino": "openvino"}[fmt])
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    for seed in (1, 2):
        write_fixture(tmp_path / f"{seed}.pt", "atto", "original", seed=seed)
    outcomes = []
    for name, extra in (("1", []), ("2", []), ("2", ["--no-cache"])):
        out = tmp_path / f"{name}{'-fresh' if extra else ''}{suffix}"
        done = run_cli("convert", str(tmp_path / f"{name}.pt"), "-o", str(out), "--to", fmt, "--json", *extra, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        outcomes.append(json.loads(done.stdout).get("built"))
    assert outcomes[:2] == [templates.TEMPLATE, templates.TEMPLATE]
    assert outcomes[2] is None  # --no-cache: no template cache at all, the writer's own fresh build
    assert (tmp_path / f"2{suffix}").read_bytes() == (tmp_path / f"2-fresh{suffix}").read_bytes()
    if fmt == "openvino":
        assert (tmp_path / "2.bin").read_bytes() == (tmp_path / "2-fresh.bin").read_bytes()


def test_a_template_another_process_is_building_is_not_waited_for(tmp_path):
    """While one process holds a template's build lock, another with other weights of the same architecture
    exports its own (the reason says so) instead of idling; once the template exists it is used."""
    import fcntl

    cache = EntryCache(tmp_path / "cache")
    ckpt = make_checkpoint("atto", seed=1)
    parts = {"architecture": templates.architecture(ckpt), "size": 64}
    kind = "template-onnx"
    entry = cache.root / kind / cache.key(kind, parts)
    entry.parent.mkdir(parents=True)
    lock = entry.parent / f".{entry.name}.lock"
    with open(lock, "a+b") as holder:  # a second open file description: flock treats it as another process
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert cache.being_built(kind, parts)
        built: list[str] = []
        reason = templates.substituted(cache, "onnx", ckpt, {"size": 64}, lambda probe, folder: built.append("x"),
                                       lambda folder: ({}, []))
        assert reason == "its template is being built by another process right now" and not built
        fcntl.flock(holder, fcntl.LOCK_UN)
    assert not cache.being_built(kind, parts)
    entry.mkdir()
    assert not cache.being_built(kind, parts)  # there: nothing to wait for
