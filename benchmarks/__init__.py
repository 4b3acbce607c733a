"""Benchmarks of the toolkit against its peers (not installed; run ``python -m benchmarks`` from the repo root).

Sections: ``conversion`` (a Huge original checkpoint to canonical and to HF, against ``cp`` and the naive
torch.load route), ``inference`` (every runtime against timm, transformers and timm's legacy ONNX export) and
``export`` (ONNX export time per path). Results: ``bench-results/bench.md`` and ``bench-results/bench.json``.

``python -m benchmarks.onnx_graph`` is a separate, one-off run: every size exported, checked and read back, and
onnxruntime latency of our graph against timm's legacy export (the figures in docs/onnx.md).
"""
