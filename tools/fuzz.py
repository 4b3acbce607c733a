"""Coverage-guided fuzzing of the readers: ``nox -s fuzz`` = ``python -m tools.fuzz`` (from the repository root).

The targets and their seeds are ``convnextv2.fixtures.hostile.fuzz_targets``: each input goes through every
format's ``sniff`` and the target's readers, and anything but the toolkit's own error is a crash.

Each target runs atheris (libFuzzer) in its own process for ``FUZZ_SECONDS`` (default 60) from the seeds in
``fixtures/seeds/<target>/`` (committed; copied, so the fuzzer's own corpus growth stays out of the tree).
A crash is saved under ``fuzz-artifacts/`` and fails the run; fuzzing goes on after it so one bug does not
hide the others within the time bound. Then the hypothesis property tests
(``parity_tests/test_hostile_fuzz.py``) run with the ``fuzz`` profile (many more examples, random seed).
``--make-seeds`` regenerates the seed files.

    python -m tools.fuzz                    # every target, FUZZ_SECONDS each, then hypothesis
    python -m tools.fuzz --seconds 10 --targets torchzip --no-hypothesis
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The repository root: the children run `python -m tools.fuzz` from here, and the property tests live here.
ROOT = Path(__file__).resolve().parents[1]
# No module of the package is imported at module level: the atheris child must import them inside
# instrument_imports, or they run without coverage feedback.


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

    from convnextv2.fixtures.hostile.fuzz_targets import CrashLog, make_reader

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
    from convnextv2.fixtures.hostile.fuzz_targets import SEED_ROOT

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
    done = subprocess.run([sys.executable, "-m", "tools.fuzz", "--child", target, "--", *args], cwd=ROOT,
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
    test_file = ROOT / "parity_tests" / "test_hostile_fuzz.py"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file),
                           "-k", "property"], capture_output=True, text=True, env=env)
    return {"target": "hypothesis", "seconds": round(time.perf_counter() - start, 1), "examples_per_test": examples,
            "exit_code": done.returncode, "summary": done.stdout.strip().splitlines()[-1:] if done.stdout else [],
            "crashed": done.returncode != 0, **({"log_tail": done.stdout[-6000:]} if done.returncode else {})}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        target = argv[1]
        rest = argv[argv.index("--") + 1:] if "--" in argv else []
        _atheris_child(target, rest)
        return 0
    from convnextv2.fixtures.hostile.fuzz_targets import TARGETS, available, make_reader, make_seeds

    parser = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__,
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
    targets = [t for t in args.targets if t != "onnx" or available(("onnx",))]
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
