"""Coverage-guided fuzzing of the readers (issue 8): ``nox -s fuzz`` = ``python -m convnextv2.parity_tests.fuzz``.

Targets: ``safetensors`` (the header parser and every safetensors-based reader: canonical, hf, timm, flax),
``torchzip`` (the zip container, the restricted unpickler and the original-layout reader) and ``onnx``. Each
input is written to a file and read; the only acceptable failure is the toolkit's own error
(``ConvNeXtV2Error``), and every format's ``sniff`` must answer True/False without raising. Anything else is a
crash: libFuzzer stops, saves the input under ``fuzz-artifacts/`` and the run fails.

Each target runs atheris (libFuzzer) in its own process for ``FUZZ_SECONDS`` (default 60) from the seeds in
``fixtures/seeds/<target>/`` (committed; copied, so the fuzzer's own corpus growth stays out of the tree).
Then the hypothesis property tests (``parity_tests/test_hostile_fuzz.py``) run with the ``fuzz`` profile
(many more examples, random seed). ``--make-seeds`` regenerates the seed files.

    python -m convnextv2.parity_tests.fuzz                    # every target, FUZZ_SECONDS each, then hypothesis
    python -m convnextv2.parity_tests.fuzz --seconds 10 --targets torchzip --no-hypothesis
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGETS = ("safetensors", "torchzip", "onnx")
FILE_NAMES = {"safetensors": "input.safetensors", "torchzip": "input.pt", "onnx": "input.onnx"}
# Read as this format (besides every sniffer); safetensors inputs also go through the other safetensors formats.
READERS = {"safetensors": ("canonical", "hf", "timm", "flax"), "torchzip": ("original",), "onnx": ("onnx",)}
SEED_ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "seeds"
# The seed model: complete ConvNeXt V2 structure at toy widths so a valid file is a few KB.
SEED_VARIANT = "custom:depths=1,1,1,1;dims=4,8,12,16"


def _available(names: tuple[str, ...]) -> list[str]:
    from convnextv2 import converters

    present = set(converters.available_formats())
    return [n for n in names if n in present]


class CrashLog:
    """Collects failures by signature (exception type and the innermost toolkit frame), one saved input each.

    Fuzzing goes on after a failure so that one bug in one reader does not hide the others within the time
    bound; the run fails at the end if anything was logged.
    """

    def __init__(self, directory: Path | None, target: str):
        self.directory = directory
        self.target = target
        self.seen: dict[str, dict[str, Any]] = {}

    def record(self, where: str, exc: BaseException, data: bytes) -> None:
        import hashlib
        import traceback

        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "/convnextv2/" in f.filename or "/work/" in f.filename] or frames
        last = ours[-1] if ours else None
        location = f"{Path(last.filename).name}:{last.lineno}" if last else "?"
        signature = f"{where} {type(exc).__name__} at {location}"
        if signature in self.seen:
            self.seen[signature]["count"] += 1
            return
        entry: dict[str, Any] = {"signature": signature, "count": 1, "message": str(exc)[:300],
                                 "traceback": "".join(traceback.format_exception(exc))[-2500:]}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha1(signature.encode()).hexdigest()[:12]
            sample = self.directory / f"{self.target}-crash-{digest}"
            sample.write_bytes(data)
            entry["input"] = str(sample)
        self.seen[signature] = entry
        self.flush()

    def flush(self) -> None:
        if self.directory is not None:
            log = self.directory / f"{self.target}-crashes.json"
            log.write_text(json.dumps(list(self.seen.values()), indent=1))


def make_reader(target: str, workdir: Path, crashes: CrashLog | None = None) -> Callable[[bytes], None]:
    """A function reading one input through every sniffer and the target's readers.

    Without a crash log it raises on the first failure other than the toolkit's own errors (for replay and
    hypothesis); with one it records the failure and carries on.
    """
    from convnextv2 import converters
    from convnextv2.reference.errors import ConvNeXtV2Error

    path = workdir / FILE_NAMES[target]
    modules = [converters.format_module(name) for name in converters.available_formats()]
    readers = _available(READERS[target])

    def sniff(module: Any) -> None:
        answer = module.sniff(path)
        if not isinstance(answer, bool):
            raise AssertionError(f"{module.NAME}.sniff returned {answer!r}, not a bool")

    def read(name: str) -> None:
        with contextlib.suppress(ConvNeXtV2Error):
            converters.load(path, format=name)

    steps = [(f"{m.NAME}.sniff", lambda m=m: sniff(m)) for m in modules]
    steps += [(f"{name}.read", lambda name=name: read(name)) for name in readers]

    def read_one(data: bytes) -> None:
        path.write_bytes(data)
        for where, step in steps:
            if crashes is None:
                step()
                continue
            try:
                step()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - every other failure is a finding
                crashes.record(where, exc, data)

    return read_one


# ------------------------------------------------------------------ the atheris child

def _atheris_child(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    # Instrument the toolkit (and the stdlib zip/json parsers it drives) for coverage feedback.
    with atheris.instrument_imports(include=["convnextv2", "zipfile", "json"]):
        from convnextv2 import converters
        from convnextv2.converters import safetensors_io, torchzip  # noqa: F401

        for name in converters.available_formats():
            converters.format_module(name)
    import warnings

    warnings.simplefilter("ignore")
    workdir = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    artifacts = next((Path(a.split("=", 1)[1]).parent for a in libfuzzer_args if a.startswith("-artifact_prefix=")),
                     None)
    read_one = make_reader(target, workdir, CrashLog(artifacts, target))
    atheris.Setup([sys.argv[0], *libfuzzer_args], read_one)
    atheris.Fuzz()


# ------------------------------------------------------------------ the driver

def run_atheris(target: str, seconds: int, artifacts: Path, rss_limit_mb: int = 2048,
                seed: int | None = None) -> dict[str, Any]:
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-corpus-{target}-"))
    seeds = SEED_ROOT / target
    for seed_file in sorted(seeds.iterdir()) if seeds.is_dir() else []:
        shutil.copy(seed_file, corpus / seed_file.name)
    artifacts.mkdir(parents=True, exist_ok=True)
    artifacts = artifacts.resolve()
    stale = artifacts / f"{target}-crashes.json"
    if stale.exists():
        stale.unlink()
    args = [str(corpus), f"-max_total_time={seconds}", f"-artifact_prefix={artifacts}/{target}-",
            f"-rss_limit_mb={rss_limit_mb}", "-timeout=20", "-print_final_stats=1", "-max_len=1048576"]
    if seed is not None:
        args.append(f"-seed={seed}")
    env = {**os.environ, "CONVNEXTV2_PROGRESS": "0"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "convnextv2.parity_tests.fuzz", "--child", target, "--", *args],
                          capture_output=True, text=True, env=env, timeout=seconds + 600)
    elapsed = time.perf_counter() - start
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", done.stderr)
    coverage = re.findall(r"\bcov: (\d+)", done.stderr)
    log = artifacts / f"{target}-crashes.json"
    findings = json.loads(log.read_text()) if log.exists() else []
    crashed = done.returncode != 0 or bool(findings)
    report = {
        "target": target, "seconds": round(elapsed, 1), "inputs": int(runs[-1]) if runs else None,
        "coverage_edges": int(coverage[-1]) if coverage else None, "seeds": len(list(seeds.glob("*"))),
        "corpus_after": len(list(corpus.iterdir())), "exit_code": done.returncode, "crashed": crashed,
        "findings": [{k: f[k] for k in ("signature", "count", "message") if k in f} | {"input": f.get("input")}
                     for f in findings],
    }
    if done.returncode != 0:
        report["log_tail"] = done.stderr[-4000:]
    shutil.rmtree(corpus, ignore_errors=True)
    return report


def run_hypothesis(examples: int) -> dict[str, Any]:
    env = {**os.environ, "CONVNEXTV2_HYPOTHESIS_PROFILE": "fuzz", "CONVNEXTV2_FUZZ_EXAMPLES": str(examples),
           "CONVNEXTV2_PROGRESS": "0"}
    test_file = Path(__file__).with_name("test_hostile_fuzz.py")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file),
                           "-k", "property"], capture_output=True, text=True, env=env)
    return {"target": "hypothesis", "seconds": round(time.perf_counter() - start, 1), "examples_per_test": examples,
            "exit_code": done.returncode, "summary": done.stdout.strip().splitlines()[-1:] if done.stdout else [],
            "crashed": done.returncode != 0, **({"log_tail": done.stdout[-6000:]} if done.returncode else {})}


# ------------------------------------------------------------------ seeds

def make_seeds(root: Path = SEED_ROOT) -> list[Path]:
    """Write the committed seed files: valid toy models in every readable format, plus a few odd ones."""
    import argparse as argparse_module
    import warnings

    import numpy as np

    from convnextv2 import converters
    from convnextv2.fixtures import hostile
    from convnextv2.fixtures.make import make_checkpoint

    written: list[Path] = []
    for target in TARGETS:
        (root / target).mkdir(parents=True, exist_ok=True)
    full = make_checkpoint(SEED_VARIANT, 0, "original", num_classes=2)
    encoder = make_checkpoint(SEED_VARIANT, 0, "fcmae")

    def save(ckpt: Any, path: Path, fmt: str, **options: Any) -> None:
        if path.exists():
            path.unlink()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converters.save(ckpt, path, format=fmt, **options)
        written.append(path)

    st = root / "safetensors"
    save(full, st / "canonical-full.safetensors", "canonical")
    save(encoder, st / "canonical-encoder.safetensors", "canonical")
    for fmt in _available(("timm", "flax")):
        save(full, st / f"{fmt}.safetensors", fmt)
    for sidecar in st.glob("*.json"):  # timm's config beside its weights: not a fuzz input
        sidecar.unlink()
    if "hf" in _available(("hf",)):
        with tempfile.TemporaryDirectory() as tmp:
            save(full, Path(tmp) / "hf", "hf")
            for weights in Path(tmp, "hf").glob("*.safetensors"):
                shutil.copy(weights, st / "hf-model.safetensors")
                written.append(st / "hf-model.safetensors")
    import ml_dtypes
    import safetensors.numpy

    odd = {"f16": np.arange(6, dtype=np.float16).reshape(2, 3), "bf16": np.ones(3, dtype=ml_dtypes.bfloat16),
           "i64": np.array([-1, 2**40], dtype=np.int64), "flag": np.array([True, False]),
           "empty": np.zeros((0, 4), dtype=np.float32), "scalar": np.array(1.5, dtype=np.float64)}
    safetensors.numpy.save_file(odd, str(st / "dtypes-by-safetensors-package.safetensors"), metadata={"k": "v"})
    written.append(st / "dtypes-by-safetensors-package.safetensors")

    tz = root / "torchzip"
    save(full, tz / "original-finetuned.pt", "original", layout="finetuned")
    save(encoder, tz / "original-fcmae.pt", "original", layout="fcmae")
    path = hostile.write_checkpoint(tz / "hostile-args.pt", {"model": {"w": np.zeros(2, np.float32)}, "args": hostile.HOLE},
                                    hostile.PAYLOADS["os_system"][0]("/nonexistent/PWNED"))
    written.append(path)
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    if torch is not None:
        # torch's own pickles use memo opcodes, serialization ids and shared storages our writer never emits.
        base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        state = {"model": {"a": base, "a_t": base.t(), "slice": base[1:, 2:], "half": base.half()},
                 "epoch": 7, "args": argparse_module.Namespace(lr=0.1, name="x", tags=[1, 2])}
        torch.save(state, tz / "torch-save.pt")
        written.append(tz / "torch-save.pt")
    if "onnx" in _available(("onnx",)):
        save(full, root / "onnx" / "toy.onnx", "onnx")
    if "keras" in _available(("keras",)):  # not a fuzz target: the base of the hostile Keras cases
        (root / "keras").mkdir(exist_ok=True)
        save(make_checkpoint(SEED_VARIANT, 0, "canonical", num_classes=2), root / "keras" / "toy.keras", "keras")
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        target = argv[1]
        rest = argv[argv.index("--") + 1:] if "--" in argv else []
        _atheris_child(target, rest)
        return 0
    parser = argparse.ArgumentParser(prog="python -m convnextv2.parity_tests.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "60")),
                        help="atheris time per target (env FUZZ_SECONDS, default 60)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--no-hypothesis", action="store_true")
    parser.add_argument("--examples", type=int, default=int(os.environ.get("FUZZ_EXAMPLES", "2000")),
                        help="hypothesis examples per property (env FUZZ_EXAMPLES)")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
    parser.add_argument("--seed", type=int, default=None, help="libFuzzer seed (default: random)")
    parser.add_argument("--json", type=Path, default=None, help="also write the reports here")
    parser.add_argument("--make-seeds", action="store_true", help="regenerate fixtures/seeds and exit")
    parser.add_argument("--replay", nargs=2, metavar=("TARGET", "FILE"), help="read one saved input, show any error")
    args = parser.parse_args(argv)
    if args.replay:
        target, file = args.replay
        make_reader(target, Path(tempfile.mkdtemp(prefix="fuzz-replay-")))(Path(file).read_bytes())
        print("no failure")
        return 0
    if args.make_seeds:
        for path in make_seeds():
            print(path)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed; it is part of the 'test' extra: pip install -c constraints.txt atheris",
              file=sys.stderr)
        return 2
    reports = []
    targets = [t for t in args.targets if t != "onnx" or _available(("onnx",))]
    for target in targets:
        report = run_atheris(target, args.seconds, args.artifacts, seed=args.seed)
        reports.append(report)
        print(json.dumps(report), flush=True)
    if not args.no_hypothesis:
        report = run_hypothesis(args.examples)
        reports.append(report)
        print(json.dumps(report), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    return 1 if any(r["crashed"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
