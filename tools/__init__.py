"""Tools that are not tests: run by hand, from the repository root, never installed or imported by the package.

    python -m tools.gpu_check     # the PyTorch and Flax references on a GPU, held to the parity rule
    python -m tools.fuzz          # coverage-guided fuzzing of the readers (nox -s fuzz)

``tools/`` sits outside the ``convnextv2`` package (docs/architecture.md): it may import any part of the
package; nothing in the package imports it. Measurements live beside it in ``benchmarks/``
(``python -m benchmarks``, ``python -m benchmarks.onnx_graph``).
"""
