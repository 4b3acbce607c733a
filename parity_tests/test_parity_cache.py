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

from convnextv2.converters import entry_cache, templates
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
    # The export is this architecture's template (built now, from the probe checkpoint) with these weights in it.
    assert cold.passed and cold.result("onnxruntime").artifacts == {"onnx": templates.TEMPLATE}
    assert cache.misses == ["torch-features", "torch-features", "onnx", "template-onnx"] and cache.hits == []

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

    # One weight changed by one ulp: every entry keyed by the weights misses; the export comes from the
    # architecture's template (converters/templates.py), keyed without them.
    changed = make_checkpoint("atto", seed=0)
    name = "stages.3.blocks.1.grn.gamma"
    changed.tensors[name] = np.nextafter(changed.tensors[name], np.float32(np.inf)).astype(np.float32)
    other_weights = ParityCache(tmp_path / "cache")
    run_parity(changed, ["onnxruntime"], image_size=64, batch=2, cache=other_weights)
    assert other_weights.hits == ["template-onnx"]
    assert other_weights.misses == ["torch-features", "torch-features", "onnx"]


def test_key_covers_the_toolkit_code_and_framework_versions(monkeypatch, tmp_path):
    cache = ParityCache(tmp_path)
    parts = {"checkpoint": "c", "size": 64}
    before = cache.key("onnx", parts)
    assert cache.key("onnx", {**parts, "size": 96}) != before and cache.key("litert", parts) != before
    monkeypatch.setattr(entry_cache, "toolkit_fingerprint", lambda: "another toolkit")
    assert cache.key("onnx", parts) != before


def test_fingerprint_changes_with_a_source_file(tmp_path, monkeypatch):
    package = tmp_path / "package"
    for folder in ("reference", "converters", "parity_tests", "fixtures"):
        (package / folder).mkdir(parents=True)
        (package / folder / "module.py").write_text("x = 1\n")
    monkeypatch.setattr(entry_cache, "__file__", str(package / "converters" / "entry_cache.py"))
    first = entry_cache.toolkit_fingerprint.__wrapped__()
    (package / "converters" / "module.py").write_text("x = 2\n")
    assert entry_cache.toolkit_fingerprint.__wrapped__() != first


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
    cache = ParityCache(tmp_path, max_bytes=3000)  # each entry: 1000 bytes of data and a record of about 300
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


# --- Entries checked against the digests recorded when they were built (cache_integrity.py) ---------------------


def _entry(root: Path, kind: str, **parts) -> Path:
    """The one entry of ``kind`` whose recorded parts include ``parts``."""
    found = [record.parent for record in (root / kind).glob("*/entry.json")
             if parts.items() <= json.loads(record.read_text())["parts"].items()]
    assert len(found) == 1, found
    return found[0]


def test_damaged_referee_entries_are_discarded_rebuilt_and_reported_once(tmp_path):
    """The issue's case: the logits in the cached referee entries (torch-features/*/arrays.npz) multiplied by
    1.001. Used as stored, the runtimes fail at logits, blamed on the checkpoint; checked against their records,
    they are built again and the run passes."""
    root = tmp_path / "cache"
    cold = run_parity(make_checkpoint("atto", seed=0), ["torch"], image_size=64, batch=2, cache=ParityCache(root))
    assert cold.passed
    intact = {}
    for stored in sorted(root.glob("torch-features/*/arrays.npz")):
        with np.load(stored) as data:
            arrays = {name: data[name] for name in data.files}
        intact[stored] = {name: array.copy() for name, array in arrays.items()}
        arrays["logits"] = arrays["logits"] * 1.001
        np.savez(stored, **arrays)
    assert len(intact) == 2  # the float64 referee and the float32 baseline

    said: list[str] = []
    warm_cache = ParityCache(root)
    warm = run_parity(make_checkpoint("atto", seed=0), ["torch"], image_size=64, batch=2, cache=warm_cache,
                      progress=said.append)
    assert warm.passed, [(r.name, r.status, r.first_divergence) for r in warm.runtimes]
    assert _numbers(warm) == _numbers(cold)
    assert warm_cache.misses == ["torch-features", "torch-features"] and warm_cache.hits == []
    assert sorted(warm.cache["discarded"]) == sorted(
        f"torch-features {stored.parent.name}: arrays.npz does not match the sha256 recorded when it was built"
        for stored in intact)
    assert [message for message in said if "discarded" in message] == [
        f"parity cache: discarded a damaged entry, built again: {line}" for line in warm.cache["discarded"]]
    for stored, arrays in intact.items():  # built again, as they were
        with np.load(stored) as data:
            assert all(np.array_equal(data[name], arrays[name]) for name in arrays)
    assert not [p for p in (root / "torch-features").iterdir() if "discarded" in p.name]

    # Sound again: the next run uses them and reports nothing.
    again = ParityCache(root)
    assert run_parity(make_checkpoint("atto", seed=0), ["torch"], image_size=64, batch=2, cache=again).passed
    assert again.misses == [] and "discarded" not in again.summary()


@pytest.mark.onnx
def test_a_truncated_export_entry_is_rebuilt(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    root = tmp_path / "cache"
    assert run_parity(make_checkpoint("atto", seed=0), ["onnxruntime"], image_size=64, batch=2,
                      cache=ParityCache(root)).passed
    (model,) = [p for p in _entry(root, "onnx").rglob("*") if p.suffix == ".onnx"]
    size = model.stat().st_size
    with open(model, "r+b") as handle:
        handle.truncate(size // 2)

    warm_cache = ParityCache(root)
    warm = run_parity(make_checkpoint("atto", seed=0), ["onnxruntime"], image_size=64, batch=2, cache=warm_cache)
    assert warm.passed and warm.result("onnxruntime").artifacts == {"onnx": templates.TEMPLATE}
    assert warm_cache.misses == ["onnx"]
    assert warm.cache["discarded"] == [
        f"onnx {_entry(root, 'onnx').name}: {model.name} is {size // 2} bytes, {size} when it was built"]
    assert model.stat().st_size == size


def _build(folder: Path) -> None:
    (folder / "model").write_bytes(b"weights" * 100)
    (folder / "nested").mkdir()
    (folder / "nested" / "model.bin").write_bytes(b"more" * 50)


def _damage_file(entry: Path) -> None:
    data = bytearray((entry / "model").read_bytes())
    data[10] ^= 1  # same size, one bit
    (entry / "model").write_bytes(bytes(data))


DAMAGES = {
    "one bit changed": (_damage_file, "model does not match the sha256 recorded when it was built"),
    "truncated": (lambda entry: (entry / "nested" / "model.bin").write_bytes(b"more"),
                  "nested/model.bin is 4 bytes, 200 when it was built"),
    "file missing": (lambda entry: (entry / "nested" / "model.bin").unlink(), "nested/model.bin is missing"),
    "file added": (lambda entry: (entry / "stray").write_bytes(b""), "stray was not in it when it was built"),
    "record missing": (lambda entry: (entry / "entry.json").unlink(), "its record entry.json is missing"),
    "record damaged": (lambda entry: (entry / "entry.json").write_text("{\"kind\": "),
                       "its record entry.json is unreadable (JSONDecodeError)"),
    "record without digests": (
        lambda entry: (entry / "entry.json").write_text(json.dumps(
            {k: v for k, v in json.loads((entry / "entry.json").read_text()).items() if k != "files"})),
        "its record entry.json lists no file digests"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_kind_of_damage_is_discarded_and_built_again(tmp_path, damage):
    harm, reason = DAMAGES[damage]
    with ParityCache(tmp_path).folder("onnx", {"k": 1}, _build) as entry:
        pass
    harm(entry)
    said: list[str] = []
    cache = ParityCache(tmp_path, progress=said.append)
    builds: list[Path] = []
    with cache.folder("onnx", {"k": 1}, lambda folder: (builds.append(folder), _build(folder))) as folder:
        assert folder == entry and (folder / "model").read_bytes() == b"weights" * 100
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
            "entry.json", "model", "nested/model.bin"]
    assert len(builds) == 1 and cache.misses == ["onnx"] and cache.hits == []
    assert cache.summary()["discarded"] == [f"onnx {entry.name}: {reason}"]
    assert len(said) == 1 and said[0].endswith(reason)
    # The rebuilt entry is used by the next reader, not built or reported again.
    again = ParityCache(tmp_path)
    with again.folder("onnx", {"k": 1}, lambda folder: pytest.fail("built again")):
        pass
    assert again.hits == ["onnx"] and again.discarded == []


def test_an_intact_entry_is_reused_and_hashed_once_per_process(tmp_path, monkeypatch):
    hashed: list[str] = []
    real = parity_cache.cache_integrity.sha256_of
    monkeypatch.setattr(parity_cache.cache_integrity, "sha256_of", lambda path: (hashed.append(path.name), real(path))[1])
    monkeypatch.setattr(parity_cache.cache_integrity, "_checked", {})
    with ParityCache(tmp_path).folder("onnx", {"k": 1}, _build):
        pass
    assert sorted(hashed) == ["model", "model.bin"]  # the record's digests, at build time
    hashed.clear()
    for _ in range(3):  # read again in this process (the builder's): its digests were just taken
        cache = ParityCache(tmp_path)
        with cache.folder("onnx", {"k": 1}, lambda folder: pytest.fail("built again")):
            pass
        assert cache.hits == ["onnx"] and cache.discarded == []
    assert hashed == []

    monkeypatch.setattr(parity_cache.cache_integrity, "_checked", {})  # another process: it checks for itself
    for _ in range(3):
        with ParityCache(tmp_path).folder("onnx", {"k": 1}, lambda folder: pytest.fail("built again")):
            pass
    assert sorted(hashed) == ["model", "model.bin"]


def test_an_entry_a_worker_built_is_checked_by_the_parent_and_worker_discards_are_reported_once(tmp_path):
    """A worker (another process) builds an entry; damaged afterwards, the parent does not take the worker's
    word for it but checks it when it reads it. A discard a worker reports comes into the parent's summary and
    progress once, however many workers report it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from convnextv2.converters import entry_cache
        from convnextv2.parity_tests import cache as parity_cache
        entry_cache.toolkit_fingerprint = lambda: sys.argv[2]  # the parent's, whatever was edited since it began
        cache = parity_cache.ParityCache.attach(Path(sys.argv[1]), persistent=True)
        with cache.folder("onnx", {"k": 1}, lambda folder: (folder / "model").write_bytes(b"graph")) as folder:
            print(folder)
    """)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), parity_cache.toolkit_fingerprint()],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    entry = Path(done.stdout.strip())
    (entry / "model").write_bytes(b"grapH")
    said: list[str] = []
    parent = ParityCache(tmp_path, progress=said.append)
    with parent.folder("onnx", {"k": 1}, lambda folder: (folder / "model").write_bytes(b"graph")) as folder:
        assert (folder / "model").read_bytes() == b"graph"
    assert parent.misses == ["onnx"] and len(parent.discarded) == 1

    worker_line = "litert 0123: model.tflite is 10 bytes, 20 when it was built"
    for _ in range(2):
        parent.merge({"hits": [], "misses": ["litert"], "discarded": [worker_line]})
    assert parent.summary()["discarded"] == [parent.discarded[0], worker_line]
    assert len(said) == 2 and said[1].endswith(worker_line)
