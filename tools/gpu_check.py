"""Parity on an accelerator: the PyTorch and Flax references on the GPU against the float64 CPU referee.

    python -m tools.gpu_check [--variants atto,tiny,base] [--size 224] [--batch 4] [--json F]

The one parity rule (convnextv2.reference.parity_rule, docs/parity.md "Tolerance") on the logits, with the PyTorch
float32 reference on the CPU (same weights, same images) as the yardstick. PyTorch runs with TF32 off (``torch.backends.cuda.matmul.allow_tf32``, ``cudnn.allow_tf32``,
``set_float32_matmul_precision("highest")``); the same model with TF32 on is reported beside it as the trap it is
(TF32 matmuls keep 10 mantissa bits), expected to fail. The Flax reference asks for ``Precision.HIGHEST`` itself. Exit 0 when every
TF32-off runtime passes, 1 when one fails, 2 when there is no GPU. Not part of CI: CI machines have no GPU.
Run from the repository root (``tools/`` is not installed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2 import reference
from convnextv2.fixtures import make_checkpoint
from convnextv2.reference import parity_rule


def _torch_logits(model: Any, images: np.ndarray, device: str) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = model.to(device)(torch.from_numpy(images).to(device))
    return out.float().cpu().numpy()


def _torch_gpu(ckpt: Any, images: np.ndarray, tf32: bool) -> np.ndarray:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        return _torch_logits(reference.build(ckpt, "torch"), images, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


def _flax_gpu(ckpt: Any, images: np.ndarray) -> np.ndarray:
    import jax

    if jax.default_backend() != "gpu":
        raise RuntimeError(f"JAX runs on {jax.default_backend()}, not a GPU")
    return reference.run_features(reference.build(ckpt, "flax"), "flax", images)["logits"]


def judged(logits: np.ndarray, cpu: np.ndarray, referee: np.ndarray) -> dict[str, Any]:
    """The float32 parity rule on the logits, the CPU float32 reference on the same images as the yardstick."""
    referee = np.asarray(referee, dtype=np.float64)
    base_error = parity_rule.scale_aware_error(cpu, referee)
    verdict = parity_rule.judge("logits", logits, referee, base_error, "float32")
    base_abs = parity_rule.max_abs_error(cpu, referee)
    return {"max_abs": verdict.max_abs_error, "torch_baseline_max_abs": base_abs,
            "ratio": verdict.max_abs_error / base_abs if base_abs else None, "scale_aware": verdict.scale_aware_error,
            "tolerance_scale_aware": parity_rule.tolerance(base_error, "float32"),
            "top1_same": bool(verdict.top1_same.all()) if verdict.top1_same is not None else True,
            "passed": verdict.passed}


def check(variant: str, size: int, batch: int) -> list[dict[str, Any]]:
    ckpt = make_checkpoint(variant, seed=0, fmt="canonical")
    images = parity_rule.seeded_images(batch, size)
    referee = parity_rule.referee_features(ckpt, images)["logits"]
    cpu = parity_rule.baseline_features(ckpt, images)["logits"]
    runtimes = {"torch cuda, TF32 off": lambda: _torch_gpu(ckpt, images, tf32=False),
                "torch cuda, TF32 on (trap)": lambda: _torch_gpu(ckpt, images, tf32=True),
                "flax gpu": lambda: _flax_gpu(ckpt, images)}
    rows = []
    for name, run in runtimes.items():
        row: dict[str, Any] = {"variant": variant, "size": size, "batch": batch, "runtime": name}
        try:
            logits = run()
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run here is reported, not fatal
            row["unavailable"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            continue
        row.update(judged(logits, cpu, referee))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="atto,tiny,base")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=parity_rule.DEFAULT_BATCH)
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = [row for variant in args.variants.split(",") for row in check(variant.strip(), args.size, args.batch)]
    print("| variant | runtime | scale-aware error | x CPU fp32 | tolerance | top-1 | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "unavailable" in r:
            print(f"| {r['variant']} | {r['runtime']} | unavailable: {r['unavailable']} | | | | |")
            continue
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        print(f"| {r['variant']} | {r['runtime']} | {r['scale_aware']:.2e} | {ratio} | {r['tolerance_scale_aware']:.2e} | "
              f"{'same' if r['top1_same'] else 'DIFFERENT'} | {'pass' if r['passed'] else 'FAIL'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    guarded = [r for r in rows if "trap" not in r["runtime"] and "unavailable" not in r]
    return 0 if guarded and all(r["passed"] for r in guarded) else 1


if __name__ == "__main__":
    sys.exit(main())
