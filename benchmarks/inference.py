"""Inference latency per runtime against the peers, interleaved, with achieved GFLOP/s.

Per variant: one worker process per framework group (benchmarks/worker.py), every runtime built from the same
seeded checkpoint, warmed up, then ``rounds`` rounds in which every runtime runs ``iters`` timed forwards
(the order rotates each round). Reported: median latency over all timed forwards, achieved GFLOP/s
(2 FLOPs per multiply-accumulate, reference.variants.GMACS_224 scaled by batch and (size/224)^2) and the
ratio against the faster of timm and transformers (PyTorch rows) or timm's legacy ONNX export (ORT row).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.worker import GROUPS

RUNTIME_LABELS = {
    "torch": "ours: PyTorch reference",
    "torch-plain": "ours: PyTorch reference, fast path off (plain math)",
    "tensorflow": "ours: TensorFlow/Keras reference",
    "flax": "ours: Flax reference",
    "onnxruntime": "ours: ONNX export (torch path) in onnxruntime",
    "timm": "peer: timm eager",
    "transformers": "peer: transformers PyTorch",
    "onnxruntime-timm": "peer: timm legacy ONNX export in onnxruntime",
}


class Worker:
    def __init__(self, group: str, threads: int):
        env = {**os.environ, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), "TF_NUM_INTRAOP_THREADS": str(threads),
               "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "CONVNEXTV2_PROGRESS": "0",
               # OpenMP threads that spin while waiting lose 5-10x on a shared, oversubscribed machine (measured:
               # atto b1 224 ms spinning vs 36 ms passive at load 12 on 2 cores); every torch runtime gets the same.
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        if threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        self.group = group
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.worker"], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL)

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            return {"ok": False, "error": f"the {self.group} worker exited ({self.process.poll()})"}
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def prepare_checkpoints(variant: str, work: Path) -> dict[str, Any]:
    """Seeded checkpoint in the original and canonical formats and as an HF folder (when the converter exists)."""
    from convnextv2 import converters
    from convnextv2.fixtures import make_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(variant, seed=0, fmt="original")
    spec: dict[str, Any] = {"variant": variant, "depths": list(ckpt.config.depths), "dims": list(ckpt.config.dims),
                            "original": str(work / f"{variant}.pt"), "canonical": str(work / f"{variant}.safetensors"),
                            "notes": {}}
    converters.save(ckpt, spec["original"], format="original", overwrite=True)
    converters.save(ckpt, spec["canonical"], format="canonical", overwrite=True)
    try:
        hf_dir = work / f"{variant}-hf"
        converters.save(ckpt, hf_dir, format="hf", overwrite=True)
        spec["hf_dir"] = str(hf_dir)
    except Exception as exc:  # noqa: BLE001
        spec["notes"]["transformers"] = f"HF conversion unavailable ({exc}); transformers timed with random weights"
    return spec


def prepare(variant: str, work: Path, log: Any) -> dict[str, Any]:
    """prepare_checkpoints, plus our ONNX export (torch path) and timm's legacy export of the same weights."""
    from benchmarks.export import export_ours, export_timm_legacy

    spec = prepare_checkpoints(variant, work)
    for key, function in (("onnx_ours", export_ours), ("onnx_timm", export_timm_legacy)):
        path = work / f"{variant}-{key}.onnx"
        try:
            if path.exists():
                path.unlink()
            function(spec, path)
            spec[key] = str(path)
        except Exception as exc:  # noqa: BLE001
            spec["notes"][key] = f"{type(exc).__name__}: {exc}"[:300]
            log(f"  {key} export failed: {spec['notes'][key]}")
    return spec


def run(variants: list[str], batches: list[int], size: int, rounds: int, iters: int, threads: int,
        runtimes: list[str], work: Path, log: Any) -> dict[str, Any]:
    from convnextv2.reference.variants import GMACS_224

    rows = []
    for variant in variants:
        log(f"inference: {variant}")
        spec = prepare(variant, work / variant, log)
        groups = {g: [r for r in members if r in runtimes] for g, members in GROUPS.items()}
        workers = {g: Worker(g, threads) for g, members in groups.items() if members}
        loaded: dict[str, Any] = {}
        errors: dict[str, str] = {}
        try:
            for group, members in groups.items():
                for runtime in members:
                    reply = workers[group].ask(op="load", runtime=runtime, spec=spec)
                    if reply.get("ok"):
                        loaded[runtime] = group
                        log(f"  loaded {runtime} in {reply['load_s']:.1f} s")
                    else:
                        errors[runtime] = reply.get("error", "failed")
                        log(f"  {runtime} not available: {errors[runtime]}")
            samples: dict[tuple[str, int], list[float]] = {}
            names = list(loaded)
            for batch in batches:
                for runtime in names:  # warm-up at this batch size (first calls allocate and pick kernels)
                    workers[loaded[runtime]].ask(op="time", runtime=runtime, batch=batch, size=size, iters=0, warmup=2)
                for index in range(rounds):
                    order = names[index % len(names):] + names[: index % len(names)] if names else []
                    for runtime in order:
                        reply = workers[loaded[runtime]].ask(op="time", runtime=runtime, batch=batch, size=size,
                                                             iters=iters, warmup=0)
                        if reply.get("ok"):
                            samples.setdefault((runtime, batch), []).extend(reply["times"])
                        else:
                            errors[runtime] = reply.get("error", "failed")
        finally:
            for worker in workers.values():
                worker.close()
        gflop = 2 * GMACS_224[variant] * (size / 224) ** 2
        for batch in batches:
            medians = {r: statistics.median(samples[(r, batch)]) for r in runtimes if (r, batch) in samples}
            torch_peers = [medians[r] for r in ("timm", "transformers") if r in medians]
            faster_peer = min(torch_peers) if torch_peers else None
            for runtime in runtimes:
                row: dict[str, Any] = {"variant": variant, "batch": batch, "size": size, "runtime": runtime,
                                       "label": RUNTIME_LABELS[runtime]}
                if runtime not in medians:
                    row["not_available"] = errors.get(runtime) or spec["notes"].get(
                        {"onnxruntime": "onnx_ours", "onnxruntime-timm": "onnx_timm"}.get(runtime, ""),
                        "not requested")
                    rows.append(row)
                    continue
                latency = medians[runtime]
                times = samples[(runtime, batch)]
                row.update({
                    "median_ms": round(latency * 1000, 2), "min_ms": round(min(times) * 1000, 2), "samples": len(times),
                    "gflops": round(gflop * batch / latency, 1),
                })
                # speedup > 1 means ours is faster than the yardstick.
                if runtime in ("torch", "tensorflow", "flax") and faster_peer:
                    row["speedup_vs_faster_torch_peer"] = round(faster_peer / latency, 2)
                if runtime in ("tensorflow", "flax") and "torch" in medians:
                    row["speedup_vs_torch_reference"] = round(medians["torch"] / latency, 2)
                if runtime == "onnxruntime" and "onnxruntime-timm" in medians:
                    row["speedup_vs_timm_onnx"] = round(medians["onnxruntime-timm"] / latency, 2)
                if runtime == "transformers" and spec["notes"].get("transformers"):
                    row["note"] = spec["notes"]["transformers"]
                rows.append(row)
        log("  " + "; ".join(f"{r['runtime']} b{r['batch']} {r.get('median_ms', '-')} ms" for r in rows
                             if r["variant"] == variant))
    return {"threads": threads, "size": size, "rounds": rounds, "iters_per_round": iters, "rows": rows,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
