"""The parity rule's false-alarm sweep: every known-good implementation x size x seed x batch size, and every
injected trap, through the one rule (convnextv2.reference.parity_rule).

    python -m benchmarks.parity_sweep [--variants atto,femto] [--seeds 0,1,2] [--batches 1,2,4,8]
        [--impls tensorflow,flax,onnxruntime,timm,transformers] [--traps atto] [--size 224]
        [--json sweep.json] [--markdown sweep.md] [--cache DIR]

For every input set the float64 PyTorch referee and the float32 PyTorch baseline are computed once (the referee
is cached on disk under --cache, keyed by variant, size, seed and batch, so a rerun or a second group of
implementations does not pay for it again). Each implementation is then built once per size and run on every
input set; what is recorded is the raw per-feature ratio e_f / b_f of its scale-aware error to the baseline's,
so any factor or floor can be evaluated afterwards (``--from-json`` re-renders the tables without running).

Known-good implementations: our PyTorch reference (its ratio to itself is 1 by construction; what is reported
for it is how much its own error b_f varies across seeds at each batch size), our Keras/TensorFlow and Flax
references in float32, onnxruntime on our PyTorch ONNX export (ORT_ENABLE_ALL, features exported) in float32
and, judged at float16, on our float16 export, timm and transformers (PyTorch) loading what our writers wrote.
Traps: every trap of parity_tests/traps.py on its exposing weights, margin = max_f e_f / tolerance_f.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.reference import parity_rule as rule

KNOWN_GOOD = ("tensorflow", "flax", "onnxruntime", "onnxruntime-fp16", "timm", "transformers")
VARIANTS = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
FeatureFn = Callable[[np.ndarray], dict[str, np.ndarray]]


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _checkpoint(variant: str) -> Any:
    from convnextv2.fixtures import make_checkpoint

    return make_checkpoint(variant, seed=0, fmt="canonical")


# ------------------------------------------------------------------ referee cache

def _cache_key(tag: str, variant: str, size: int, seed: int, batch: int) -> str:
    return hashlib.sha256(f"{tag}|{variant}|{size}|{seed}|{batch}".encode()).hexdigest()[:16]


def _referee(ckpt: Any, tag: str, variant: str, size: int, seed: int, batch: int,
             cache: Path | None) -> dict[str, np.ndarray]:
    path = cache / f"referee-{tag}-{variant}-{size}-s{seed}-b{batch}-{_cache_key(tag, variant, size, seed, batch)}.npz" \
        if cache else None
    if path is not None and path.exists():
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    features = rule.referee_features(ckpt, rule.seeded_images(batch, size, seed))
    gc.collect()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **features)
    return features


# ------------------------------------------------------------------ implementations (built once per size)

def _prepare(name: str, ckpt: Any, size: int, work: Path) -> FeatureFn:
    from convnextv2 import reference

    if name in ("tensorflow", "flax"):
        model = reference.build(ckpt, name)
        return lambda images: reference.run_features(model, name, images)
    if name in ("onnxruntime", "onnxruntime-fp16"):
        from convnextv2 import converters
        from convnextv2.converters.onnx import session as onnx_session

        fp16 = name.endswith("fp16")
        path = work / f"{name}.onnx"
        converters.save(ckpt, path, "onnx", overwrite=True, gate=converters.GateOptions(batch=1), features=True,
                        fp16=fp16, size=size)
        session = onnx_session.ort_session(path, threads=2)
        return lambda images: {k: v.astype(np.float32) for k, v in onnx_session.run_ort(session, images).items()
                               if k in rule.FEATURES}
    from convnextv2.parity_tests import runtimes

    runtime = runtimes.get({"timm": "timm", "transformers": "transformers-pt"}[name])
    reason = runtime.availability()
    if reason:
        raise RuntimeError(reason)
    # The harness's own peer runners: they build the peer from what our writers wrote, on every call.
    return lambda images: runtime.open(ckpt).infer(images, "float32")


def _precision(name: str) -> str:
    return "float16" if name.endswith("fp16") else "float32"


# ------------------------------------------------------------------ the sweep

def sweep_size(variant: str, size: int, seeds: list[int], batches: list[int], impls: list[str],
               cache: Path | None, say: Callable[[str], None]) -> list[dict[str, Any]]:
    ckpt = _checkpoint(variant)
    records: list[dict[str, Any]] = []
    baselines: dict[tuple[int, int, str], dict[str, float]] = {}
    inputs = [(seed, batch) for batch in batches for seed in seeds]
    precisions = ("float32", "bfloat16", "float16")
    for seed, batch in inputs:
        start = time.perf_counter()
        referee = _referee(ckpt, "fixture0", variant, size, seed, batch, cache)
        images = rule.seeded_images(batch, size, seed)
        for precision in precisions:
            baselines[seed, batch, precision] = rule.baseline_errors(
                rule.baseline_features(ckpt, images, precision), referee)
            records.append({"kind": "baseline", "impl": f"torch-{precision}", "variant": variant, "size": size,
                            "seed": seed, "batch": batch, "errors": baselines[seed, batch, precision]})
        del referee
        gc.collect()
        say(f"{variant}@{size} seed {seed} batch {batch}: referee + baselines {time.perf_counter() - start:.1f}s")
    with tempfile.TemporaryDirectory(prefix="parity-sweep-") as tmp:
        for impl in impls:
            start = time.perf_counter()
            try:
                run = _prepare(impl, ckpt, size, Path(tmp))
            except Exception as exc:  # an implementation missing here is reported, the sweep goes on
                say(f"{variant}@{size} {impl}: unavailable ({type(exc).__name__}: {str(exc)[:200]})")
                records.append({"kind": "unavailable", "impl": impl, "variant": variant, "size": size,
                                "reason": f"{type(exc).__name__}: {str(exc)[:300]}"})
                continue
            for seed, batch in inputs:
                referee = _referee(ckpt, "fixture0", variant, size, seed, batch, cache)
                got = run(rule.seeded_images(batch, size, seed))
                base = baselines[seed, batch, _precision(impl)]
                errors = {n: rule.scale_aware_error(got[n], referee[n]) for n in rule.FEATURES if n in got}
                top1 = bool(np.array_equal(np.argmax(got["logits"], 1), np.argmax(referee["logits"], 1)))
                records.append({"kind": "impl", "impl": impl, "precision": _precision(impl), "variant": variant,
                                "size": size, "seed": seed, "batch": batch, "errors": errors,
                                "ratios": {n: errors[n] / base[n] if base[n] > 0 else math.inf for n in errors},
                                "top1_same": top1})
                del referee, got
                gc.collect()
            del run
            gc.collect()
            say(f"{variant}@{size} {impl}: {time.perf_counter() - start:.1f}s")
    return records


def sweep_traps(variant: str, size: int, seeds: list[int], batches: list[int], cache: Path | None,
                say: Callable[[str], None]) -> list[dict[str, Any]]:
    from convnextv2.parity_tests import traps

    records = []
    plain = _checkpoint(variant)
    for name, trap in traps.TRAPS.items():
        ckpt = trap.expose(plain) if trap.expose else plain
        tag = f"expose-{name}" if trap.expose else "fixture0"
        runtime = traps.trap_runtime(name)
        start = time.perf_counter()
        for batch in batches:
            for seed in seeds:
                images = rule.seeded_images(batch, size, seed)
                referee = _referee(ckpt, tag, variant, size, seed, batch, cache)
                base = rule.baseline_errors(rule.baseline_features(ckpt, images), referee)
                got = runtime.open(ckpt).infer(images, "float32")
                errors = {n: rule.scale_aware_error(got[n], referee[n]) for n in rule.FEATURES if n in got}
                records.append({"kind": "trap", "impl": name, "first_stage": trap.first_stage, "variant": variant,
                                "size": size, "seed": seed, "batch": batch, "errors": errors, "baseline": base,
                                "ratios": {n: errors[n] / base[n] if base[n] > 0 else math.inf for n in errors}})
        say(f"trap {name} on {variant}@{size}: {time.perf_counter() - start:.1f}s")
    return records


# ------------------------------------------------------------------ analysis

def analyse(records: list[dict[str, Any]], factor: float, floor: float) -> dict[str, Any]:
    """Per implementation x size: the worst known-good error/tolerance; per trap: the smallest margin."""
    baselines = {(r["impl"], r["variant"], r["size"], r["seed"], r["batch"]): r["errors"]
                 for r in records if r["kind"] == "baseline"}

    def tol(b: float) -> float:
        return max(factor * b, floor)

    good: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r["kind"] != "impl":
            continue
        base = baselines[(f"torch-{r['precision']}", r["variant"], r["size"], r["seed"], r["batch"])]
        for feature, err in r["errors"].items():
            ratio = err / tol(base[feature]) if tol(base[feature]) > 0 else math.inf
            key = (r["impl"], r["variant"])
            if key not in good or ratio > good[key]["ratio"]:
                good[key] = {"ratio": ratio, "raw": r["ratios"][feature], "feature": feature, "seed": r["seed"],
                             "batch": r["batch"], "cases": 0, "top1_all_same": True}
    for r in records:
        if r["kind"] == "impl":
            good[(r["impl"], r["variant"])]["cases"] += 1
            good[(r["impl"], r["variant"])]["top1_all_same"] &= r["top1_same"]
    spread: dict[tuple[str, str], dict[tuple[int, str], list[float]]] = {}
    for r in records:
        if r["kind"] != "baseline":
            continue
        key = (r["impl"], r["variant"])
        for feature, b in r["errors"].items():
            cell = spread.setdefault(key, {}).setdefault((r["batch"], feature), [])
            cell.append(b)
    variability = {}
    for key, cells in spread.items():
        worst = max(((max(v) / min(v) if min(v) > 0 else math.inf), batch, feature)
                    for (batch, feature), v in cells.items())
        smallest = min(min(v) for v in cells.values())
        variability[key] = {"max_over_min": worst[0], "batch": worst[1], "feature": worst[2],
                            "smallest_baseline": smallest}
    trap_rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r["kind"] != "trap":
            continue
        margins = {f: r["errors"][f] / tol(r["baseline"][f]) if tol(r["baseline"][f]) > 0 else math.inf
                   for f in r["errors"]}
        feature = max(margins, key=lambda f: margins[f])
        first = next(f for f in rule.FEATURES if f in margins and margins[f] > 1.0) if max(margins.values()) > 1 \
            else None
        key = (r["impl"], r["variant"])
        if key not in trap_rows or margins[feature] < trap_rows[key]["margin"]:
            trap_rows[key] = {"margin": margins[feature], "feature": feature, "first_failing": first,
                              "expected_first": r["first_stage"], "seed": r["seed"], "batch": r["batch"]}
    return {"good": good, "variability": variability, "traps": trap_rows}


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else (f"{x:.3g}" if x >= 0.01 else f"{x:.2e}")


def render(records: list[dict[str, Any]], factor: float, floor: float, meta: dict[str, Any]) -> str:
    result = analyse(records, factor, floor)
    order = {v: i for i, v in enumerate(VARIANTS)}
    lines = [f"Rule: tolerance = max({factor:g} x baseline, {floor:g}); "
             f"{meta.get('note', '')}".rstrip(), "",
             "| implementation | size | cases | worst error / tolerance | e/b | feature | seed, batch | top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for (impl, variant), row in sorted(result["good"].items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        lines.append(f"| {impl} | {variant} | {row['cases']} | {_fmt(row['ratio'])} | {_fmt(row['raw'])} | "
                     f"{row['feature']} | {row['seed']}, {row['batch']} | "
                     f"{'same' if row['top1_all_same'] else 'DIFFERENT somewhere'} |")
    unavailable = sorted({(r["impl"], r["variant"], r["reason"]) for r in records if r["kind"] == "unavailable"})
    for impl, variant, reason in unavailable:
        lines.append(f"| {impl} | {variant} | 0 | unavailable: {reason[:120]} | | | | |")
    lines += ["", "Baseline variability (PyTorch reference's own error across seeds, same batch size):", "",
              "| baseline | size | worst max/min over seeds | batch | feature | smallest baseline |", "|---|---|---|---|---|---|"]
    for (impl, variant), row in sorted(result["variability"].items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        lines.append(f"| {impl} | {variant} | {_fmt(row['max_over_min'])} | {row['batch']} | {row['feature']} | "
                     f"{row['smallest_baseline']:.2e} |")
    if result["traps"]:
        lines += ["", "| trap | size | smallest margin (error / tolerance) | feature | first failing | expected | seed, batch |",
                  "|---|---|---|---|---|---|---|"]
        for (impl, variant), row in sorted(result["traps"].items()):
            lines.append(f"| {impl} | {variant} | {_fmt(row['margin'])} | {row['feature']} | {row['first_failing']} | "
                         f"{row['expected_first']} | {row['seed']}, {row['batch']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="atto,femto,pico,nano,tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--impls", default=",".join(KNOWN_GOOD))
    parser.add_argument("--traps", default="atto", help="sizes to run every trap on ('' for none)")
    parser.add_argument("--trap-batches", default="2,8")
    parser.add_argument("--factor", type=float, default=rule.FACTOR)
    parser.add_argument("--floor", type=float, default=rule.FLOOR["float32"])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "convnextv2-parity-sweep")
    parser.add_argument("--json", type=Path, default=None, help="append this run's records to this file")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, action="append", default=[],
                        help="render earlier runs' records only (repeatable)")
    args = parser.parse_args(argv)
    meta: dict[str, Any] = {}
    if args.from_json:
        records = [r for path in args.from_json for r in json.loads(path.read_text())["records"]]
    else:
        def say(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

        started = time.perf_counter()
        records = []
        seeds, batches = [int(s) for s in _csv(args.seeds)], [int(b) for b in _csv(args.batches)]
        meta = {"seconds": 0.0, "machine": platform.platform(), "argv": argv if argv is not None else sys.argv[1:]}
        previous = json.loads(args.json.read_text()) if args.json and args.json.exists() else {"runs": [], "records": []}

        def save() -> None:
            # After every size, so an interrupted sweep keeps what it measured.
            meta["seconds"] = time.perf_counter() - started
            if args.json:
                args.json.write_text(json.dumps({"runs": previous["runs"] + [meta],
                                                 "records": previous["records"] + records}, indent=0) + "\n")

        for variant in _csv(args.variants):
            records += sweep_size(variant, args.size, seeds, batches, _csv(args.impls), args.cache, say)
            save()
        for variant in _csv(args.traps):
            records += sweep_traps(variant, args.size, seeds, [int(b) for b in _csv(args.trap_batches)], args.cache, say)
            save()
        say(f"wall time {meta['seconds']:.0f}s")
    text = render(records, args.factor, args.floor, meta)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
