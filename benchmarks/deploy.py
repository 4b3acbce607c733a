"""python -m benchmarks.deploy [--variants atto,tiny,base] [--batches 1,8] [--size 224] ...

Latency of the deployment runtimes (OpenVINO, LiteRT, ExecuTorch) beside our PyTorch reference, with achieved
GFLOP/s (2 FLOPs per multiply-accumulate: reference.variants.GMACS_224 x batch x (size/224)^2). Each runtime
runs the file our exporter writes, loaded the way its users load it, at float32 (OpenVINO pinned to f32, since
its CPU default may be bfloat16). A runtime that is not installed is listed with the reason, not measured.

Per variant every runtime is prepared once (export, load, two warm-up calls), then ``rounds`` rounds in which each
runs ``iters`` timed calls per batch size, the order rotating each round so that a load change on a shared
machine hits every runtime alike. Reported: the median over all timed calls.

Writes benchmarks/results/deploy.json and the table into docs/benchmarks.md (section "Deployment runtimes").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path("benchmarks/results/deploy.json")
DOC = Path("docs/benchmarks.md")
SECTION = "## Deployment runtimes"
# runtime -> what is measured
LABELS = {
    "torch": "ours: PyTorch reference (float32 fast path)",
    "executorch": "ExecuTorch 1.5, XNNPACK delegate (.pte from convert --to executorch)",
    "openvino": "OpenVINO CPU, INFERENCE_PRECISION_HINT=f32 (IR from convert --to openvino)",
    "litert": "LiteRT interpreter (.tflite from convert --to litert)",
}
RUNTIMES = tuple(LABELS)
Runner = Callable[[np.ndarray], Any]


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _unavailable(name: str) -> str | None:
    """Why a runtime cannot run here, from the parity runtime registry (the runtimes are defined once)."""
    import importlib

    from convnextv2.parity_tests import runtimes

    if name in runtimes.RUNTIMES:
        return runtimes.get(name).availability()
    # A format module without its parity runtime registered yet still says what it needs.
    try:
        module = importlib.import_module(f"convnextv2.converters.{name}")
    except ModuleNotFoundError:
        return f"no {name} runtime in this version of the toolkit"
    reason: str | None = module.why_unavailable() if hasattr(module, "why_unavailable") else None
    return reason


def _prepare_torch(ckpt: Any, size: int, work: Path, threads: int) -> Runner:
    import torch

    from convnextv2 import reference

    torch.set_num_threads(threads)
    model = reference.build(ckpt, "torch")

    def run(images: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(images))
    return run


def _prepare_executorch(ckpt: Any, size: int, work: Path, threads: int) -> Runner:
    import torch
    from executorch.runtime import Runtime

    from convnextv2.converters import executorch

    path = work / "model.pte"
    path.write_bytes(executorch.program_bytes(ckpt, size, features=False))
    method = Runtime.get().load_program(path).load_method(executorch.METHOD)

    def run(images: np.ndarray) -> Any:
        return method.execute([torch.from_numpy(images)])
    return run


def _prepare_openvino(ckpt: Any, size: int, work: Path, threads: int) -> Runner:
    from convnextv2 import converters
    from convnextv2.converters import openvino

    path = work / "model.xml"
    converters.save(ckpt, path, "openvino", overwrite=True, size=size)
    compiled, _ = openvino.compile_ir(path, "float32", threads=threads)
    return lambda images: openvino.run(compiled, images)


def _prepare_litert(ckpt: Any, size: int, work: Path, threads: int) -> Runner:
    from convnextv2 import converters
    from convnextv2.converters import litert

    path = work / "model.tflite"
    converters.save(ckpt, path, "litert", overwrite=True, size=size)
    interp = litert.interpreter(path, threads=threads)
    return lambda images: litert.run(interp, images)


PREPARE = {"torch": _prepare_torch, "executorch": _prepare_executorch, "openvino": _prepare_openvino,
           "litert": _prepare_litert}


def measure_variant(variant: str, batches: list[int], size: int, rounds: int, iters: int, threads: int,
                    names: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    from convnextv2.fixtures import make_checkpoint
    from convnextv2.reference.variants import GMACS_224

    ckpt = make_checkpoint(variant, 0, "canonical")
    gmacs = GMACS_224[variant] * (size / 224) ** 2
    images = {b: np.random.default_rng(b).standard_normal((b, 3, size, size), dtype=np.float32) for b in batches}
    rows: dict[str, Any] = {}
    runners: dict[str, Runner] = {}
    with tempfile.TemporaryDirectory(prefix=f"convnextv2-bench-deploy-{variant}-") as tmp:
        for name in names:
            reason = _unavailable(name)
            if reason is not None:
                rows[name] = {"status": "skipped", "reason": reason}
                log(f"{variant}: {name} skipped: {reason}")
                continue
            log(f"{variant}: preparing {name}")
            work = Path(tmp) / name
            work.mkdir()
            start = time.perf_counter()
            try:
                runner = PREPARE[name](ckpt, size, work, threads)
                for b in batches:
                    runner(images[b])
                    runner(images[b])
            except Exception as exc:  # a runtime that cannot prepare is reported, the others still run
                rows[name] = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
                log(f"{variant}: {name} failed: {rows[name]['reason']}")
                continue
            rows[name] = {"status": "ok", "prepare_s": time.perf_counter() - start, "times": {b: [] for b in batches}}
            runners[name] = runner
        order = list(runners)
        for round_index in range(rounds):
            shift = round_index % max(len(order), 1)
            for name in order[shift:] + order[:shift]:
                for b in batches:
                    for _ in range(iters):
                        start = time.perf_counter()
                        runners[name](images[b])
                        rows[name]["times"][b].append(time.perf_counter() - start)
    for row in rows.values():
        if row["status"] != "ok":
            continue
        times = row.pop("times")
        row["batches"] = {}
        for b, values in times.items():
            median = statistics.median(values)
            row["batches"][str(b)] = {"median_ms": median * 1e3, "images_per_s": b / median,
                                      "gflops": 2 * gmacs * b / median, "samples": len(values)}
    return {"variant": variant, "gmacs": gmacs, "runtimes": rows}


def markdown(results: dict[str, Any]) -> str:
    batches = [str(b) for b in results["options"]["batches"]]
    machine = results["machine"]
    lines = [
        SECTION,
        "",
        f"`python -m benchmarks.deploy` (run by `nox -s bench`), {results['started']}: {machine['cpus']} CPUs, "
        f"{results['options']['threads']} threads per runtime, {results['options']['size']} px, median of "
        f"{results['options']['rounds']} x {results['options']['iters']} timed calls per cell, float32, load "
        f"average {machine['load_average_at_start'][0]:.1f} at start and {machine['load_average_at_end'][0]:.1f} "
        "at the end (a shared machine: compare rows of one run, not runs). Each runtime runs the file our "
        "exporter writes, loaded as its users load it. JSON: `benchmarks/results/deploy.json`.",
        "",
        "| size | runtime | " + " | ".join(f"batch {b}: ms | x torch | GFLOP/s" for b in batches) + " | prepare s |",
        "|---|---|" + "---:|---:|---:|" * len(batches) + "---:|",
    ]
    skipped: list[str] = []
    for entry in results["variants"]:
        reference = entry["runtimes"].get("torch", {})
        for name, row in entry["runtimes"].items():
            if row["status"] != "ok":
                skipped.append(f"- {entry['variant']} {name}: {row['status']}: {row['reason']}")
                continue
            cells = []
            for b in batches:
                cell = row["batches"][b]
                # The ratio to our PyTorch reference measured in the same rounds: what survives a noisy machine.
                base = reference.get("batches", {}).get(b) if reference.get("status") == "ok" else None
                ratio = f"{cell['median_ms'] / base['median_ms']:.2f}" if base else "-"
                cells.append(f"{cell['median_ms']:.1f} | {ratio} | {cell['gflops']:.1f}")
            lines.append(f"| {entry['variant']} | {LABELS[name]} | " + " | ".join(cells)
                         + f" | {row['prepare_s']:.0f} |")
    if skipped:
        lines += ["", "Not measured:", "", *skipped]
    return "\n".join(lines) + "\n"


def write_section(doc: Path, text: str, section: str = SECTION) -> None:
    """Replace the section (from its heading to the next ``## ``) or append it."""
    content = doc.read_text() if doc.exists() else ""
    start = content.find(section + "\n")
    if start < 0:
        content = content.rstrip("\n") + "\n\n" + text
    else:
        following = content.find("\n## ", start + len(section))
        content = content[:start] + text + ("\n" + content[following + 1:] if following >= 0 else "")
    doc.write_text(content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="atto,tiny,base")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file whose deployment section is replaced")
    args = parser.parse_args(argv)
    names = _csv(args.runtimes)
    unknown = set(names) - set(RUNTIMES)
    if unknown:
        parser.error(f"unknown runtimes {sorted(unknown)}; expected some of {', '.join(RUNTIMES)}")
    os.environ["CONVNEXTV2_PROGRESS"] = "0"
    # Before any framework is imported. OpenMP threads that spin while waiting lose 5-10x on a shared machine
    # (benchmarks/inference.py measured it); every runtime gets the same thread count.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    batches = [int(b) for b in _csv(args.batches)]
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": list(os.getloadavg())},
        "options": {"variants": _csv(args.variants), "batches": batches, "size": args.size, "rounds": args.rounds,
                    "iters": args.iters, "threads": args.threads, "runtimes": names},
        "variants": [],
    }
    for variant in _csv(args.variants):
        results["variants"].append(measure_variant(variant, batches, args.size, args.rounds, args.iters,
                                                   args.threads, names, log))
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    write_section(args.doc, markdown(results))
    log(f"wrote {args.json} and the '{SECTION[3:]}' section of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
