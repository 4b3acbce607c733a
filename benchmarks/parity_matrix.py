"""python -m benchmarks.parity_matrix [--groups torch,tf,...] [-- PYTEST ARGS]

Where the time of ``nox -s parity`` goes, group by group: the bench runs ``nox -s parity`` itself (all the
groups in sequence, one nox process, so they share the run's parity cache as they do in CI) with
``--parity-timings``, and splits each group's wall time with the cases' own records: building the fixture files
(test set-up), the float64 referee and float32 baseline (computed once per size and cached on disk across the
groups), and per runtime its import, export, build, compile and forward. The goal (issue: parity at CI speed):
all groups in sequence <= 10 minutes. Arguments after ``--`` go to pytest (``-- -k atto-224`` measures a slice).

Writes benchmarks/results/parity_matrix.json and the table into docs/benchmarks.md (section "Parity matrix").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path("benchmarks/results/parity_matrix.json")
DOC = Path("docs/benchmarks.md")
SECTION = "## Parity matrix"
GOAL_S = 600.0
PHASES = ("referee", "worker start", "import", "export", "build", "compile", "forward", "default compile")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def summarise(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group: cases, outcomes, wall (first start to last stop), set-up seconds, phase sums."""
    groups: dict[str, dict[str, Any]] = {}
    for line in lines:
        for group in line["groups"] or ["(none)"]:
            entry = groups.setdefault(group, {"cases": 0, "outcomes": {}, "setup_s": 0.0, "call_s": 0.0,
                                              "phases": {}, "start": None, "stop": None, "exports": {}})
            if line["start"] is not None:
                entry["start"] = min(entry["start"] or line["start"], line["start"])
                entry["stop"] = max(entry["stop"] or line["stop"], line["stop"])
            if line["when"] == "setup":
                entry["setup_s"] += line["duration"]
                continue
            entry["cases"] += 1
            entry["outcomes"][line["outcome"]] = entry["outcomes"].get(line["outcome"], 0) + 1
            entry["call_s"] += line["duration"]
            parity = line.get("parity") or {}
            for name, seconds in parity.get("phases", {}).items():
                entry["phases"][name] = entry["phases"].get(name, 0.0) + seconds
            for key in parity.get("artifacts", []):
                entry["exports"][key] = entry["exports"].get(key, 0) + 1
    for entry in groups.values():
        entry["wall_s"] = (entry["stop"] - entry["start"]) if entry["start"] is not None else 0.0
    return groups


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    total = results["wall_s"]
    lines = [
        SECTION,
        "",
        f"`python -m benchmarks.parity_matrix` (run by `nox -s bench`), {results['started']}: {machine['cpus']} CPUs, "
        f"load average {machine['load_average_at_start'][0]:.1f} at start. `nox -s parity"
        f"{' -- ' + ' '.join(results['pytest_args']) if results['pytest_args'] else ''}`: every group in sequence "
        f"in one nox process (2 pytest workers), an empty parity cache and referee cache at the start. "
        + (f"**All groups: {total:.0f} s** (goal <= {GOAL_S:.0f} s: {'met' if total <= GOAL_S else 'not met'}). "
           if results["complete"] else f"**A slice** (sessions {', '.join(results['sessions'])}; pytest "
           f"{' '.join(results['pytest_args']) or '(all cases)'}): {total:.0f} s; the goal (<= {GOAL_S:.0f} s) is "
           "for the whole matrix. ")
        + "Seconds; the phase columns add up the cases of both pytest workers (so they can pass the wall time); "
        "other is the rest of the cases' time (reading the fixture files back, the first case writing them). "
        "JSON: `benchmarks/results/parity_matrix.json`.",
        "",
        "| group | cases | outcomes | wall | " + " | ".join(PHASES) + " | runtimes | other | exports |",
        "|---|---:|---|---:|" + "---:|" * len(PHASES) + "---:|---:|---|",
    ]
    for group, entry in results["groups"].items():
        phases = entry["phases"]
        cells = " | ".join(f"{phases[p]:.0f}" if p in phases else "" for p in PHASES)
        outcomes = ", ".join(f"{n} {k}" for k, n in sorted(entry["outcomes"].items()))
        exports = ", ".join(f"{n} {k}" for k, n in sorted(entry["exports"].items()))
        other = entry["call_s"] + entry["setup_s"] - phases.get("referee", 0.0) - phases.get("runtime total", 0.0)
        lines.append(f"| {group} | {entry['cases']} | {outcomes} | {entry['wall_s']:.0f} | {cells} | "
                     f"{phases.get('runtime total', 0.0):.0f} | {max(0.0, other):.0f} | {exports} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity_matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="", help="comma list of groups (default: every nox parity group)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file whose parity matrix section is replaced")
    args = parser.parse_args(own)
    sessions = [f"parity(group='{g}')" for g in _csv(args.groups)] or ["parity"]
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": list(os.getloadavg())},
        "sessions": sessions, "pytest_args": pytest_args, "complete": sessions == ["parity"] and not pytest_args,
    }
    with tempfile.TemporaryDirectory(prefix="convnextv2-bench-matrix-") as tmp:
        timings = Path(tmp) / "timings.jsonl"
        pytest_cache = Path(tmp) / "pytest-cache"  # the referee cache starts empty, as on a fresh CI runner
        nox = shutil.which("nox", path=str(Path(sys.executable).parent)) or "nox"
        started = time.perf_counter()
        done = subprocess.run([nox, "-s", *sessions, "--", "--parity-timings", str(timings),
                               "-o", f"cache_dir={pytest_cache}", *pytest_args], text=True)
        results["wall_s"] = time.perf_counter() - started
        results["nox_exit"] = done.returncode
        lines = [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else []
    results["groups"] = summarise(lines)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    from benchmarks.deploy import write_section

    write_section(args.doc, markdown(results), SECTION)
    print(f"wrote {args.json} and the '{SECTION[3:]}' section of {args.doc}", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
