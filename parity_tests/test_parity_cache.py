"""The parity cache (parity_tests/cache.py): a second run of the same checkpoint reuses the exports and the
referee and reaches the same verdicts with the same numbers; a changed checkpoint, image set or toolkit never
hits an old entry; ``--no-cache`` keeps nothing; a cache that cannot be written is reported and bypassed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from convnextv2.fixtures import make_checkpoint, write_fixture
from convnextv2.parity_tests import cache as parity_cache
from convnextv2.parity_tests.cache import ParityCache
from convnextv2.parity_tests.conftest_helpers import run_cli
from convnextv2.parity_tests.harness import run_parity

pytestmark = pytest.mark.torch


def _numbers(report) -> list[tuple[str, str, str, float | None]]:
    return [(r.name, r.status, f.name, f.scale_aware_error) for r in report.runtimes for f in r.features]


@pytest.mark.onnx
def test_second_run_reuses_exports_and_referee_and_agrees(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    cache = ParityCache(tmp_path / "cache")
    ckpt = make_checkpoint("atto", seed=0)
    cold = run_parity(ckpt, ["torch", "onnxruntime"], image_size=64, batch=2, cache=cache)
    assert cold.passed and cold.result("onnxruntime").artifacts == {"onnx": "built"}
    assert cache.misses == ["torch-features", "torch-features", "onnx"] and cache.hits == []

    warm_cache = ParityCache(tmp_path / "cache")
    warm = run_parity(make_checkpoint("atto", seed=0), ["torch", "onnxruntime"], image_size=64, batch=2,
                      cache=warm_cache)
    assert warm_cache.misses == [] and sorted(warm_cache.hits) == ["onnx", "torch-features", "torch-features"]
    assert warm.result("onnxruntime").artifacts == {"onnx": "cached"}
    assert _numbers(warm) == _numbers(cold)  # the same graph and referee: the very same figures
    assert warm.result("onnxruntime").phases["export"] < cold.result("onnxruntime").phases["export"]

    # Other images: the referee is computed again; the export does not depend on them.
    other_images = ParityCache(tmp_path / "cache")
    run_parity(make_checkpoint("atto", seed=0), ["onnxruntime"], image_size=64, batch=2, seed=5, cache=other_images)
    assert other_images.misses == ["torch-features", "torch-features"] and other_images.hits == ["onnx"]

    # One weight changed by one ulp: every entry misses.
    changed = make_checkpoint("atto", seed=0)
    name = "stages.3.blocks.1.grn.gamma"
    changed.tensors[name] = np.nextafter(changed.tensors[name], np.float32(np.inf)).astype(np.float32)
    other_weights = ParityCache(tmp_path / "cache")
    run_parity(changed, ["onnxruntime"], image_size=64, batch=2, cache=other_weights)
    assert other_weights.hits == [] and other_weights.misses == ["torch-features", "torch-features", "onnx"]


def test_key_covers_the_toolkit_code_and_framework_versions(monkeypatch, tmp_path):
    cache = ParityCache(tmp_path)
    parts = {"checkpoint": "c", "size": 64}
    before = cache.key("onnx", parts)
    assert cache.key("onnx", {**parts, "size": 96}) != before and cache.key("litert", parts) != before
    monkeypatch.setattr(parity_cache, "toolkit_fingerprint", lambda: "another toolkit")
    assert cache.key("onnx", parts) != before


def test_fingerprint_changes_with_a_source_file(tmp_path, monkeypatch):
    package = tmp_path / "package"
    for folder in ("reference", "converters", "parity_tests", "fixtures"):
        (package / folder).mkdir(parents=True)
        (package / folder / "module.py").write_text("x = 1\n")
    monkeypatch.setattr(parity_cache, "__file__", str(package / "parity_tests" / "cache.py"))
    first = parity_cache.toolkit_fingerprint.__wrapped__()
    (package / "converters" / "module.py").write_text("x = 2\n")
    assert parity_cache.toolkit_fingerprint.__wrapped__() != first


def test_a_failed_build_leaves_no_entry_and_the_next_one_builds(tmp_path):
    cache = ParityCache(tmp_path)

    def broken(folder: Path) -> None:
        (folder / "half").write_bytes(b"x")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"), cache.folder("onnx", {"k": 1}, broken):
        pass
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    with cache.folder("onnx", {"k": 1}, lambda folder: (folder / "model").write_bytes(b"ok")) as folder:
        assert (folder / "model").read_bytes() == b"ok"
    assert cache.misses == ["onnx", "onnx"]


def test_least_recently_used_entries_go_past_the_size_limit(tmp_path):
    cache = ParityCache(tmp_path, max_bytes=2500)
    for index in range(4):
        with cache.folder("blob", {"i": index}, lambda folder: (folder / "data").write_bytes(b"x" * 1000)):
            pass
        entry = next(p for p in (tmp_path / "blob").iterdir() if (p / "entry.json").exists()
                     and json.loads((p / "entry.json").read_text())["parts"] == {"i": index})
        os.utime(entry / "entry.json", (1000 + index, 1000 + index))
    kept = sorted(json.loads(p.read_text())["parts"]["i"] for p in (tmp_path / "blob").glob("*/entry.json"))
    assert kept == [2, 3]


def test_no_cache_keeps_nothing_and_the_default_is_xdg_cache_home(tmp_path):
    src = tmp_path / "atto.safetensors"
    write_fixture(src, "atto", "canonical", seed=0)
    xdg = tmp_path / "xdg"
    env = {"XDG_CACHE_HOME": str(xdg)}
    done = run_cli("parity", str(src), "--runtimes", "torch", "--image-size", "64", "--batch", "2", "--no-cache",
                   "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["cache"] == {"persistent": False, "root": None, "hits": [],
                               "misses": ["torch-features", "torch-features"]}
    assert not xdg.exists()
    done = run_cli("parity", str(src), "--runtimes", "torch", "--image-size", "64", "--batch", "2", "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["cache"]["persistent"] and report["cache"]["root"] == str(xdg / "convnextv2")
    assert len(list((xdg / "convnextv2" / "torch-features").glob("*/entry.json"))) == 2
    assert set(report["timings"]) >= {"startup", "load", "torch float64", "torch float32"}


def test_an_unwritable_cache_is_reported_and_bypassed(tmp_path):
    if os.geteuid() == 0:
        # root writes through permission bits; a read-only file where the cache folder should be stops it too.
        (tmp_path / "xdg").write_bytes(b"not a folder")
    else:
        (tmp_path / "xdg").mkdir()
        (tmp_path / "xdg").chmod(stat.S_IRUSR | stat.S_IXUSR)
    cache = ParityCache(tmp_path / "xdg" / "convnextv2")
    with pytest.warns(UserWarning, match="running without the cache"):
        report = run_parity(make_checkpoint("atto", seed=0), ["torch"], image_size=64, batch=2, cache=cache)
    assert report.passed and report.cache["note"].startswith("not used:")


def test_a_second_process_waits_for_an_entry_being_built_and_uses_it(tmp_path):
    """Two processes after one entry (two pytest or parity workers): the second waits for the first's build and
    finds it, instead of building it again; no lock file is left."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from convnextv2.parity_tests.cache import ParityCache

        def build(folder):
            Path(sys.argv[2]).write_text("building")  # tells the test the lock is held
            time.sleep(2)
            (folder / "model").write_text(sys.argv[3])

        cache = ParityCache(Path(sys.argv[1]))
        with cache.folder("onnx", {"k": 1}, build) as folder:
            print((folder / "model").read_text(), cache.hits, cache.misses)
    """)
    flag = tmp_path / "first-is-building"
    first = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache"), str(flag), "first"],
                             stdout=subprocess.PIPE, text=True)
    for _ in range(600):
        if flag.exists() or first.poll() is not None:
            break
        __import__("time").sleep(0.05)
    second = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache"), str(tmp_path / "unused"),
                             "second"], capture_output=True, text=True)
    assert first.communicate()[0].strip() == "first [] ['onnx']"
    assert second.stdout.strip() == "first ['onnx'] []", second.stderr[-2000:]
    assert not (tmp_path / "unused").exists()  # the second never built
    assert list((tmp_path / "cache").rglob("*.lock")) == []
