"""ONNX export time per path (torch, tensorflow, flax) and of timm's legacy export, each in a fresh process.

Our times include the export's own check (onnx.checker, then onnxruntime against the float64 referee at the
check size) and the read-back of the written graph (converters.save): an export is only written once both pass.
timm's legacy export has no check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

EXPORT_OURS = r"""
import json, sys, time
start = time.perf_counter()
from convnextv2 import converters
imported = time.perf_counter()
ckpt = converters.load(sys.argv[1])
result = converters.save(ckpt, sys.argv[2], "onnx", overwrite=True, via=sys.argv[3], size=int(sys.argv[4]))
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "export_and_check_s": done - imported, "ok": result["check"]["ok"]}))
"""

EXPORT_TIMM = r"""
import json, sys, time
start = time.perf_counter()
import numpy as np, torch
from convnextv2.converters.torchzip import read_torch_zip
from convnextv2.converters.runners.peers import import_timm
timm = import_timm()
from timm.models.convnext import checkpoint_filter_fn
imported = time.perf_counter()
model = timm.create_model(f"convnextv2_{sys.argv[3]}", pretrained=False).eval()
state = {k: torch.from_numpy(np.array(v)) for k, v in read_torch_zip(sys.argv[1])["model"].items()}
model.load_state_dict(checkpoint_filter_fn(state, model))
torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), sys.argv[2], dynamo=False, input_names=["pixel_values"],
                  output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "export_and_check_s": done - imported, "ok": True}))
"""


def _run(script: str, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "CONVNEXTV2_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError((done.stderr or done.stdout).strip().splitlines()[-1][:300] if (done.stderr or done.stdout)
                           else f"exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_ours(spec: dict[str, Any], path: Path, via: str = "torch", check_size: int = 224) -> dict[str, Any]:
    return _run(EXPORT_OURS, [spec["canonical"], str(path), via, str(check_size)])


def export_timm_legacy(spec: dict[str, Any], path: Path) -> dict[str, Any]:
    return _run(EXPORT_TIMM, [spec["original"], str(path), spec["variant"]])


def run(variants: list[str], work: Path, log: Any) -> dict[str, Any]:
    from benchmarks.inference import prepare_checkpoints
    from convnextv2.converters.onnx import export as onnx_export

    rows = []
    for variant in variants:
        spec = prepare_checkpoints(variant, work / variant)
        for via in onnx_export.VIAS:
            row: dict[str, Any] = {"variant": variant, "path": via}
            reason = onnx_export.why_unavailable(via)
            if reason:
                row["not_available"] = reason
            else:
                try:
                    row.update(export_ours(spec, work / variant / f"export-{via}.onnx", via=via))
                except Exception as exc:  # noqa: BLE001
                    row["not_available"] = f"{type(exc).__name__}: {exc}"[:300]
            log(f"  export {variant} via {via}: {row}")
            rows.append(row)
        row = {"variant": variant, "path": "timm legacy (torch.onnx.export dynamo=False, no check)"}
        try:
            row.update(export_timm_legacy(spec, work / variant / "export-timm.onnx"))
        except Exception as exc:  # noqa: BLE001
            row["not_available"] = f"{type(exc).__name__}: {exc}"[:300]
        log(f"  export {variant} timm legacy: {row}")
        rows.append(row)
        for file in (work / variant).glob("export-*"):
            file.unlink()
    return {"rows": rows}
