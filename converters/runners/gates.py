"""Checks of written files, each one ``parity_rule.check`` of a runner against the float64 PyTorch referee:

* ``check_output``: the export gate of a file just written (ONNX, OpenVINO IR, .tflite, .pte), run by its format's
  runtime on the seeded images; ONNX is first put through onnx.checker.
* ``verify_conversion`` (``convert --verify``): the source run by its own runtime and the written output by its
  own, both against the referee of the source's tensors.
* ``onnx_import``: an ONNX graph as written (every graph optimisation off) against the PyTorch reference built from
  the tensors the reader recovered from it.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path
from typing import Any

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.runners import registry
from convnextv2.converters.runners.base import FileSource, RunContext
from convnextv2.reference import parity_rule as rule
from convnextv2.reference.errors import BadInputError, CheckFailedError, MissingDependencyError
from convnextv2.reference.features import final_feature

# Images per functional check: the ONNX export gate's number. The rule's baseline is a maximum over the batch;
# four images keep its spread within the rule's margin (docs/parity.md) at half the cost of the default eight.
VERIFY_BATCH = 4
# The runtime each exported format is gated by, and what the user calls such a file in a refusal.
GATES = {"onnx": ("onnxruntime", "graph"), "openvino": ("openvino", "IR"), "litert": ("litert", "file"),
         "executorch": ("executorch", "program")}


# ------------------------------------------------------------------ export gates

def check_output(ckpt: Checkpoint, path: Path, format: str, *, size: int, batch: int = 4,
                 precision: str = "float32") -> rule.Verdict:
    """The export gate of a written file: the file run by its format's runner against the float64 referee of
    ``ckpt`` at ``precision``'s rule. The verdict's reason is the gate's one-line message; ``gate_summary`` gives
    the figures a command prints."""
    if format not in GATES:
        raise BadInputError(f"no export gate for a {format} file")
    images = rule.seeded_images(batch, size, rule.DEFAULT_SEED)
    if format == "onnx":
        import onnx

        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as exc:
            return _refused(format, precision, f"onnx.checker: {exc}")
    referee = rule.Referee.build(ckpt, images, (precision,))
    runner = registry.get(GATES[format][0]).open(FileSource(Path(path), format, ckpt))
    if format == "executorch":
        verdict = rule.check(runner, referee, precision)
        if verdict.status == "error":  # the runtime's own refusal is the check's finding
            return _refused(format, precision, f"the ExecuTorch runtime cannot run it: {verdict.reason}")
    else:
        try:
            verdict = rule.check(runner, referee, precision, errors="raise")
        except Exception:
            if format == "openvino" and getattr(runner, "ran_at", precision) != precision:
                return _refused(format, precision,
                                f"OpenVINO compiled at {runner.ran_at} although float32 was asked for")
            raise
    gc.collect()
    final = final_feature(ckpt.config)
    outputs = {f.name: _output_figures(f, referee, precision) for f in verdict.features if f.status != "not-exposed"}
    if final not in outputs:
        noun = GATES[format][1]
        return _refused(format, precision,
                        f"the {noun} has no {final!r} output (outputs: {sorted(outputs)})")
    verdict.reason = _gate_message(format, precision, final, outputs, runner)
    verdict.tolerance = verdict.tolerance or rule.Tolerance(precision)
    verdict.figures = {"images": [batch, 3, size, size], "outputs": outputs, **_extras(format, runner)}
    return verdict


def gate_summary(verdict: rule.Verdict) -> dict[str, Any]:
    """A gate's verdict as the commands report it (their JSON predates the verdict): ``ok``, the message, the
    images and the per-output figures."""
    return {"ok": verdict.passed, "message": verdict.reason, **verdict.figures}


def _refused(format: str, precision: str, message: str) -> rule.Verdict:
    runner = GATES[format][0]
    return rule.Verdict(runner, registry.get(runner).kind, precision, "fail", message)


def _output_figures(feature: rule.FeatureResult, referee: rule.Referee, precision: str) -> dict[str, Any]:
    base_abs = referee.baseline_max_abs[rule.baseline_precision(precision)][feature.name]
    figures: dict[str, Any] = {
        "max_abs": feature.max_abs_error, "torch_baseline_max_abs": base_abs,
        "baseline_dtype": rule.baseline_precision(precision),
        "ratio": feature.max_abs_error / base_abs if base_abs and feature.max_abs_error is not None else None,
        "scale_aware": feature.scale_aware_error,
        "tolerance_scale_aware": rule.tolerance(referee.baseline(precision)[feature.name], precision),
        "within": (feature.max_abs_error is not None and feature.tolerance_abs is not None
                   and feature.max_abs_error <= feature.tolerance_abs),
        "passed": feature.status == "pass"}
    if feature.top1_agreement is not None:
        figures["top1_same"] = feature.top1_agreement == 1.0
        figures["top1_real_flips"] = feature.top1_real_flips
    return figures


def _gate_message(format: str, precision: str, final: str, outputs: dict[str, dict[str, Any]], runner: Any) -> str:
    figures = outputs[final]
    failing = [name for name, v in outputs.items() if not v["passed"]]
    ran = {"litert": lambda: f"; run by {_litert_name()}",
           "openvino": lambda: f"; ran at {runner.ran_at}"}.get(format, lambda: "")()
    return (f"{final}: max|d| {figures['max_abs']:.3e} vs float64 referee, PyTorch {figures['baseline_dtype']} "
            f"{figures['torch_baseline_max_abs']:.3e}"
            + (f" (ratio {figures['ratio']:.2f})" if figures["ratio"] is not None else "")
            + f", top-1 {'identical' if figures.get('top1_same', True) else 'DIFFERENT'}"
            + (f"; failing: {', '.join(failing)}" if failing else "")
            + f"{ran}; bar: the {precision} parity rule ({rule.describe(precision)}; docs/parity.md)")


def _litert_name() -> str:
    from convnextv2.converters import litert

    return litert.interpreter_name()


def _extras(format: str, runner: Any) -> dict[str, Any]:
    if format == "litert":
        return {"interpreter": _litert_name()}
    if format == "openvino":
        return {"precision": runner.ran_at}
    return {}


# ------------------------------------------------------------------ --verify and the ONNX import check

def check_size(ckpt: Checkpoint, path: Path, format: str) -> int:
    """The image size a check runs at: the graph's own when an ONNX graph fixes one, else the checkpoint's."""
    if format == "onnx":
        from convnextv2.converters.runners import artifact

        size = artifact.probe(Path(path)).image_size
        if size:
            return int(size)
    return int(ckpt.preprocessing.input_size)


@dataclasses.dataclass
class FileCheck:
    """One file run by the runner of its format, judged on its final feature against the referee (--verify, the
    ONNX import check). The figures are set when the feature came back finite and in the referee's shape."""

    runner: str
    passed: bool
    seconds: float
    message: str
    feature: str | None = None
    max_abs: float | None = None
    tolerance: float | None = None
    torch_float32_max_abs: float | None = None

    def to_json_dict(self) -> dict[str, Any]:
        figures = ({} if self.feature is None else
                   {"feature": self.feature, "max_abs": self.max_abs, "tolerance": self.tolerance,
                    "torch_float32_max_abs": self.torch_float32_max_abs})
        return {"runner": self.runner, **figures, "passed": self.passed, "seconds": self.seconds,
                "message": self.message}


def _file_check(referee: rule.Referee, path: Path, format: str, ckpt: Checkpoint) -> FileCheck:
    """One file run by the runner of its format against ``referee`` (its final feature only)."""
    entry = registry.for_format(format)
    reason = entry.availability()
    if reason is not None and entry.kind == "peer":
        module = next(m for m in entry.record.requires if m in reason)
        raise MissingDependencyError(f"--verify runs this format with {module}, which is not installed: "
                                     f"pip install {module}")
    if entry.name == "artifact":
        verdict, label = _artifact_check(Path(path), ckpt, referee)
    else:
        runner = entry.open(FileSource(Path(path), format, ckpt), RunContext())
        verdict, label = rule.check(runner, referee, "float32", errors="raise"), runner.label
    gc.collect()
    final = final_feature(ckpt.config)
    feature = verdict.feature(final)
    seconds = round(verdict.seconds, 3)
    if feature is None or feature.status == "not-exposed":
        return FileCheck(label, False, seconds, f"{final} is not exposed")
    if feature.max_abs_error is None:
        expected = list(referee.features[final].shape)
        message = (f"{final} is not finite" if feature.message == "non-finite values"
                   else f"{final} has shape {feature.shape}, expected {expected}")
        return FileCheck(label, False, seconds, message)
    return FileCheck(label, feature.status == "pass", seconds,
                     feature.message or "within the float32 parity rule", final, feature.max_abs_error,
                     feature.tolerance_abs, referee.baseline_max_abs["float32"][final])


def _artifact_check(path: Path, ckpt: Checkpoint, referee: rule.Referee) -> tuple[rule.Verdict, str]:
    """A file made anywhere, run as written by the artifact runner at float32 (the precision these checks judge);
    one that cannot run here is refused with the reason, one the runtime cannot load is the check's failure."""
    from convnextv2.converters.runners import artifact

    found = artifact.probe(path, artifact.Pins(precision="float32"))
    verdict = artifact.check(found, ckpt, referee, localise=False)
    if verdict.status == "unavailable":
        raise MissingDependencyError(f"{path}: {verdict.reason}")
    if verdict.status == "error" and not verdict.features:
        raise CheckFailedError(f"{path}: {found.runtime} cannot run it: {verdict.reason}")
    return verdict, found.runtime


def _referee(ckpt: Checkpoint, size: int) -> rule.Referee:
    images = rule.seeded_images(VERIFY_BATCH, size, rule.DEFAULT_SEED)
    return rule.Referee.build(ckpt, images, ("float32",), only=(final_feature(ckpt.config),))


def verify_conversion(ckpt: Checkpoint, source_path: Path, source_format: str, output_path: Path,
                      output_format: str, written: Checkpoint) -> dict[str, Any]:
    """``convert --verify``: the source run by its own runtime and the output (read back as ``written``) by its
    own, both judged against the float64 referee of the source's tensors; CheckFailedError when either fails.
    Returns the summary ``--json`` prints."""
    size = check_size(ckpt, Path(source_path), source_format)
    referee = _referee(ckpt, size)
    checks = {"source": _file_check(referee, Path(source_path), source_format, ckpt),
              "output": _file_check(referee, Path(output_path), output_format, written)}
    failing = [f"{side} ({check.runner}): {check.message}" for side, check in checks.items() if not check.passed]
    if failing:
        raise CheckFailedError(f"--verify: {'; '.join(failing)}; nothing written")
    return {"images": [int(referee.images.shape[0]), 3, size, size], "referee_seconds": round(referee.seconds, 3),
            **{side: check.to_json_dict() for side, check in checks.items()}, "passed": True}


def onnx_import(ckpt: Checkpoint, path: Path) -> dict[str, Any]:
    """The graph at ``path`` in onnxruntime (optimisations off) against the PyTorch reference of the tensors
    read from it; CheckFailedError when they disagree by the parity rule. Returns the summary ``--json``
    prints."""
    started = time.perf_counter()
    referee = _referee(ckpt, check_size(ckpt, Path(path), "onnx"))
    check = _file_check(referee, Path(path), "onnx", ckpt)
    if not check.passed:
        raise CheckFailedError(f"{path}: the graph's function differs from the PyTorch reference built from the "
                               f"tensors read from it ({check.message}); nothing written")
    return {**check.to_json_dict(), "referee_seconds": round(referee.seconds, 3),
            "seconds": round(time.perf_counter() - started, 3)}
