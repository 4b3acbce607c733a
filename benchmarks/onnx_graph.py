"""One-off ONNX measurements reported in docs/onnx.md (not a test): every size exported, checked and read back;
onnxruntime latency of our export (opset 18 and 20) against timm's legacy export, same run.

    python -m benchmarks.onnx_graph --out onnx-bench.json [--sizes atto,tiny] [--skip-latency]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2 import converters
from convnextv2.converters.onnx import export as onnx_export
from convnextv2.converters.onnx import session as onnx_session
from convnextv2.fixtures import make_checkpoint
from convnextv2.reference.parity_rule import seeded_images
from convnextv2.reference.variants import VARIANTS


def every_size(sizes: list[str], work: Path, log: Any) -> list[dict[str, Any]]:
    rows = []
    for variant in sizes:
        ckpt = make_checkpoint(variant, seed=0, fmt="canonical")
        out = work / f"{variant}.onnx"
        start = time.perf_counter()
        result = converters.save(ckpt, out, "onnx", overwrite=True, size=224)
        seconds = time.perf_counter() - start
        logits = result["check"]["outputs"]["logits"]
        data = out.with_name(onnx_export.data_file_name(out))
        data_path = data if data.exists() else None
        start = time.perf_counter()
        back = converters.load(out)
        read_seconds = time.perf_counter() - start
        exact = all(np.array_equal(np.asarray(back.tensors[k]), v) for k, v in ckpt.model_tensors().items())
        row = {"variant": variant, "ok": result["check"]["ok"], "ort_max_abs": logits["max_abs"],
               "torch_fp32_max_abs": logits["torch_baseline_max_abs"], "ratio": logits["ratio"],
               "top1_same": logits.get("top1_same"), "export_and_check_s": round(seconds, 1),
               "import_s": round(read_seconds, 2), "import_bit_exact": exact,
               "model_bytes": out.stat().st_size,
               "data_bytes": data_path.stat().st_size if data_path else 0}
        log(json.dumps(row))
        rows.append(row)
        for file in (out, data_path):
            if file is not None:
                file.unlink()
    return rows


def _latency(session: Any, images: np.ndarray, repeats: int) -> float:
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: images})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: images})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def latency(work: Path, repeats: int, threads: int, log: Any) -> list[dict[str, Any]]:
    import torch

    from convnextv2.converters.runners.peers import import_timm
    from convnextv2.converters.torchzip import read_torch_zip

    timm = import_timm()
    from timm.models.convnext import checkpoint_filter_fn

    rows = []
    images = seeded_images(1, 224)
    for variant in ("atto", "tiny"):
        ckpt = make_checkpoint(variant, seed=0, fmt="original")
        files = {}
        for opset in (18, 20):
            files[f"ours_opset{opset}"] = work / f"{variant}_{opset}.onnx"
            converters.save(ckpt, files[f"ours_opset{opset}"], "onnx", overwrite=True, opset=opset, size=224)
        src = work / f"{variant}.pt"
        converters.save(ckpt, src, format="original", overwrite=True)
        state = {k: torch.from_numpy(np.array(v)) for k, v in read_torch_zip(src)["model"].items()}
        model = timm.create_model(f"convnextv2_{variant}", pretrained=False).eval()
        model.load_state_dict(checkpoint_filter_fn(state, model))
        files["timm_legacy"] = work / f"{variant}_timm_legacy.onnx"
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(files["timm_legacy"]), dynamo=False)
        timings: dict[str, list[float]] = {}
        # Interleave the files, several rounds, so background load hits them alike.
        sessions = {k: onnx_session.ort_session(p, threads=threads) for k, p in files.items()}
        for _ in range(3):
            for key, session in sessions.items():
                timings.setdefault(key, []).append(_latency(session, images, repeats))
        row: dict[str, Any] = {"variant": variant, "batch": 1, "threads": threads,
                               **{f"{k}_ms": round(min(v), 2) for k, v in timings.items()}}
        row["ratio_ours18_vs_timm_legacy"] = round(row["ours_opset18_ms"] / row["timm_legacy_ms"], 3)
        row["ratio_ours20_vs_ours18"] = round(row["ours_opset20_ms"] / row["ours_opset18_ms"], 3)
        log(json.dumps(row))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_graph", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default=",".join(VARIANTS))
    parser.add_argument("--skip-sizes", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_latency:
            report["latency"] = latency(work, args.repeats, args.threads, print)
        if not args.skip_sizes:
            report["every_size"] = every_size(args.sizes.split(","), work, print)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
