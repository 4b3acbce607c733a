"""Runners: one contract for running a checkpoint or a file made anywhere and returning its stage features
(base.py), one registry (registry.py), and the checks of written files built on ``parity_rule.check``
(gates.py: the export gates, ``convert --verify``, the ONNX import check)."""

from convnextv2.converters.runners.base import (
    ArtifactCache,
    FileSource,
    FunctionRunner,
    RunContext,
    Runner,
    RunnerRecord,
    TemporaryCache,
    Timings,
)
from convnextv2.converters.runners.gates import (
    VERIFY_BATCH,
    FileCheck,
    check_output,
    check_size,
    gate_summary,
    onnx_import,
    verify_conversion,
)
from convnextv2.converters.runners.registry import REGISTRY, Entry, available, for_format, get, names, register

__all__ = ["REGISTRY", "VERIFY_BATCH", "ArtifactCache", "Entry", "FileCheck", "FileSource", "FunctionRunner", "RunContext",
           "Runner", "RunnerRecord", "TemporaryCache", "Timings", "available", "check_output", "check_size",
           "for_format", "gate_summary", "get", "names", "onnx_import", "register", "verify_conversion"]
