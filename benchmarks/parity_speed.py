"""python -m benchmarks.parity_speed [--variants atto,tiny,base] [--runtimes all]

Where the time of a single-checkpoint ``convnextv2 parity`` goes, as a user runs it: the command line in a fresh
process on an original ``.pt`` at 224 px, every runtime. Each variant runs three times: **cold** (an empty
``$XDG_CACHE_HOME``: every export and the float64 referee built), **warm** (the same checkpoint again: exports
and referee from the parity cache, every runtime still run) and **new weights** (a second checkpoint of the same
architecture: each export from its architecture's template with the new weights written in and proven,
converters/templates.py; the referee computed afresh). The wall time is split with the report's own
figures: interpreter start and the command line's imports, reading the checkpoint, the PyTorch referee and
baseline, then per runtime its import, export, build, compile and forward; what is left is reporting and
teardown. Goals (issue: parity at CI speed): tiny on every runtime <= 30 s cold and <= 15 s warm; new weights
within 1.3x warm (issue 26).

Writes benchmarks/results/parity_speed.json and the table into docs/benchmarks.md (section "Parity speed").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path("benchmarks/results/parity_speed.json")
DOC = Path("docs/benchmarks.md")
SECTION = "## Parity speed"
GOALS = {"cold": 30.0, "warm": 15.0}
STATES = ("cold", "warm", "new weights")
NEW_WEIGHTS_GOAL = 1.3  # x warm
PHASES = ("worker start", "import", "export", "build", "compile", "forward", "default compile")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run_once(src: Path, runtimes: str, cache_home: Path, jobs: str, log: Any) -> dict[str, Any]:
    from convnextv2.parity_tests.workers import ENV_JOBS

    env = {k: v for k, v in os.environ.items() if k != ENV_JOBS}
    env.update({"XDG_CACHE_HOME": str(cache_home), "CONVNEXTV2_PROGRESS": "0"})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "convnextv2.converters", "parity", str(src), "--runtimes", runtimes,
                           "--json", *(["--jobs", jobs] if jobs != "auto" else [])], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        log(done.stderr[-2000:])
        return {"wall_s": wall, "exit": done.returncode, "error": done.stderr.strip().splitlines()[-1:]}
    report = json.loads(done.stdout)
    timings = report.get("timings", {})
    rows = {}
    for row in report["runtimes"]:
        key = row["name"] if row["dtype"] == "float32" else f"{row['name']} ({row['dtype']})"
        rows[key] = {"status": row["status"], "seconds": row["seconds"], "phases": row.get("phases", {}),
                     "artifacts": row.get("artifacts", {})}
    referee = sum(v for k, v in timings.items() if k.startswith("torch "))
    runtime_sum = sum(r["seconds"] for r in rows.values())
    workers = "waiting for workers" in timings
    # With workers the referee and the runtimes overlap: their section lasts the referee plus the wait after it.
    section = referee + (timings["waiting for workers"] if workers else runtime_sum)
    accounted = sum(timings.get(k, 0.0) for k in ("startup", "load", "hand-off", "reports")) + section
    return {"wall_s": wall, "exit": 0, "passed": report["passed"], "timings": timings, "runtimes": rows,
            "workers": workers, "referee_s": referee, "runtimes_sum_s": runtime_sum, "section_s": section,
            "other_s": max(0.0, wall - accounted), "cache": report.get("cache")}


def measure(variant: str, runtimes: str, jobs: str, work: Path, log: Any) -> dict[str, Any]:
    from convnextv2.fixtures import write_fixture

    src = work / f"{variant}.pt"
    second = work / f"{variant}-second.pt"  # the same architecture, other weights
    if not src.exists():
        write_fixture(src, variant, "original", seed=0)
        write_fixture(second, variant, "original", seed=1)
    cache_home = work / f"cache-{variant}-jobs-{jobs}"
    entry: dict[str, Any] = {"variant": variant, "jobs": jobs}
    for state in STATES:
        log(f"parity {variant}.pt, {state}, jobs {jobs}")
        entry[state] = run_once(second if state == "new weights" else src, runtimes, cache_home, jobs, log)
        log(f"  {entry[state]['wall_s']:.1f} s")
    return entry


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        SECTION,
        "",
        f"`python -m benchmarks.parity_speed` (run by `nox -s bench`), {results['started']}: {machine['cpus']} CPUs, "
        f"load average {machine['load_average_at_start'][0]:.1f} at start and "
        f"{machine['load_average_at_end'][0]:.1f} at the end. `convnextv2 parity NAME.pt` (original .pt, 224 px, "
        "8 images, every runtime) in a fresh process; cold: empty cache; warm: the same checkpoint again; new "
        "weights: a second checkpoint of the same size after the first (exports from their templates); jobs: "
        "worker processes (auto: one per core; 1: every runtime in the command's own process). Seconds. The "
        "referee and the workers overlap: \"referee + runtimes\" is that section's wall time, \"runtimes summed\" "
        "adds each runtime's own seconds. JSON: `benchmarks/results/parity_speed.json`.",
        "",
        "| size | jobs | run | wall | goal | start-up + imports | read | hand-off | referee + baseline | "
        "referee + runtimes | runtimes summed | other |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["variants"]:
        for state in [s for s in STATES if s in entry]:
            run = entry[state]
            if run.get("exit"):
                lines.append(f"| {entry['variant']} | {entry['jobs']} | {state} | {run['wall_s']:.1f} | exit "
                             f"{run['exit']}: {' '.join(run.get('error', []))} | | | | | | | |")
                continue
            timings = run["timings"]
            goal = ""
            if state == "new weights" and not entry["warm"].get("exit"):
                ratio = run["wall_s"] / entry["warm"]["wall_s"]
                goal = f"{ratio:.2f}x warm (<= {NEW_WEIGHTS_GOAL}x: {'met' if ratio <= NEW_WEIGHTS_GOAL else 'not met'})"
            elif entry["variant"] == "tiny" and entry["jobs"] == "auto":
                goal = f"<= {GOALS[state]:.0f}: {'met' if run['wall_s'] <= GOALS[state] else 'not met'}"
            lines.append(f"| {entry['variant']} | {entry['jobs']} | {state} | {run['wall_s']:.1f} | {goal} | "
                         f"{timings.get('startup', 0):.1f} | {timings.get('load', 0):.1f} | "
                         f"{timings.get('hand-off', 0):.1f} | {run['referee_s']:.1f} | {run['section_s']:.1f} | "
                         f"{run['runtimes_sum_s']:.1f} | {run['other_s']:.1f} |")
    lines += ["", "Per runtime (seconds: total, and import / export / build / compile / forward; OpenVINO's "
              "default-precision compile shown apart):", "",
              "| size | jobs | run | runtime | total | " + " | ".join(PHASES) + " | exports |",
              "|---|---|---|---|---:|" + "---:|" * len(PHASES) + "---|"]
    for entry in results["variants"]:
        for state in [s for s in STATES if s in entry]:
            run = entry[state]
            for name, row in run.get("runtimes", {}).items():
                phases = row["phases"]
                cells = " | ".join(f"{phases[p]:.1f}" if p in phases else "" for p in PHASES)
                exports = ", ".join(f"{k} {v}" for k, v in row["artifacts"].items())
                lines.append(f"| {entry['variant']} | {entry['jobs']} | {state} | {name} | {row['seconds']:.1f} | "
                             f"{cells} | {exports} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="atto,tiny,base")
    parser.add_argument("--runtimes", default="all")
    parser.add_argument("--one-process", default="tiny",
                        help="variants measured with --jobs 1 as well (the same work without workers)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file whose parity speed section is replaced")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": list(os.getloadavg())},
        "options": {"variants": _csv(args.variants), "runtimes": args.runtimes, "one_process": args.one_process},
        "variants": [],
    }
    with tempfile.TemporaryDirectory(prefix="convnextv2-bench-parity-") as tmp:
        for variant in _csv(args.variants):
            results["variants"].append(measure(variant, args.runtimes, "auto", Path(tmp), log))
            if variant in _csv(args.one_process):
                results["variants"].append(measure(variant, args.runtimes, "1", Path(tmp), log))
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    from benchmarks.deploy import write_section

    write_section(args.doc, markdown(results), SECTION)
    log(f"wrote {args.json} and the '{SECTION[3:]}' section of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
