"""A deployment artifact made by any tool, judged against its checkpoint's float64 PyTorch referee.

``probe`` reads what the file says about itself (format by content, runtime, signature, stored precision);
``check`` runs it in its own runtime and finds its conventions (layout, batch, image size, input dtype, input
range, output kind, classes): from the signature where it says, otherwise by running every candidate and keeping
the one whose final output is closest to the referee's. Every candidate tried is reported with its scale-aware
error, so a convention never turns a failing artifact into a pass silently. The chosen run is judged by the rule
of the precision found (float32, float16, bfloat16: reference/parity_rule.py; int8: reference/quantization_rule.py),
and, where the artifact's intermediate tensors can be read, mapped onto the stages to name the first divergence
(converters/runners/localise.py). Formats and runtimes: converters/runners/artifact_formats.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.runners import artifact_formats as formats
from convnextv2.converters.runners import artifact_judging
from convnextv2.converters.runners.base import Runner, RunnerRecord
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError, MissingDependencyError

ARTIFACT_FORMATS = ("onnx", "litert", "openvino", "executorch", "keras", "savedmodel", "torch-export", "tensorrt",
                    "coreml")
LAYOUTS = ("NCHW", "NHWC")
INPUT_RANGES = ("normalized", "unit", "byte")
OUTPUT_KINDS = ("logits", "probabilities", "pooled")
ARTIFACT_PRECISIONS = ("float32", "float16", "bfloat16", "int8")
# Output names that say what the output is (transformers names the pooled features pooler_output).
_OUTPUT_NAMES = {"logits": "logits", "pooled": "pooled", "pooler_output": "pooled"}
_CONVENTIONS = ("layout", "batch", "image_size", "input_dtype", "input_range", "output", "classes")
_PIN_CHOICES = {"layout": LAYOUTS, "input_range": INPUT_RANGES, "output": OUTPUT_KINDS,
                "precision": ARTIFACT_PRECISIONS}


@dataclasses.dataclass
class Pins:
    """What the user pins on the command line; None = find it."""

    layout: str | None = None
    input_range: str | None = None
    output: str | None = None
    precision: str | None = None

    def __post_init__(self) -> None:
        for key, choices in _PIN_CHOICES.items():
            value = getattr(self, key)
            if value is not None and value not in choices:
                raise BadInputError(f"artifact {key} must be one of {', '.join(choices)}, got {value!r}")


@dataclasses.dataclass
class Probe:
    """What the file says about itself, read before the referee is built."""

    path: Path
    format: str
    runtime: str
    precision: str
    precision_how: str
    unavailable: str | None
    signature: dict[str, Any]

    @property
    def image_size(self) -> int | None:
        """The static image size the artifact takes, when its signature fixes one (either layout)."""
        shape = (self.signature.get("inputs") or [{}])[0].get("shape")
        if not shape or len(shape) != 4:
            return None
        spatial = shape[2:] if shape[1] == 3 and shape[3] != 3 else shape[1:3]
        return spatial[0] if spatial[0] is not None and spatial[0] == spatial[1] else None


def probe(path: Path, pins: Pins | None = None) -> Probe:
    """Read ``path``: its format (by content), runtime, signature and precision; BadInputError (one line naming the
    file and the cause) for a truncated, unreadable or unknown file."""
    path = Path(path)
    opened = _open(path)
    found = Probe(path, opened.format, opened.runtime, opened.precision, opened.precision_how, opened.unavailable,
                  {"inputs": [p.to_json() for p in opened.inputs], "outputs": [p.to_json() for p in opened.outputs]})
    if pins is not None and pins.precision is not None:
        found.precision_how = f"pinned (the file says: {found.precision}, {found.precision_how})"
        found.precision = pins.precision
    return found


def _open(path: Path) -> formats.Opened:
    return formats.OPENERS[formats.detect(path)](path)


# ------------------------------------------------------------------ conventions

@dataclasses.dataclass
class _Candidate:
    layout: str
    input_range: str
    outputs: dict[str, np.ndarray] | None = None
    error: str = ""  # why this candidate could not run


def _choice(value: Any, how: str, **extra: Any) -> dict[str, Any]:
    return {"value": value, "how": how, **extra}


def _layouts(port: formats.Port, pins: Pins) -> tuple[list[str], str]:
    if pins.layout:
        return [pins.layout], "pinned"
    shape = port.shape or []
    if len(shape) == 4 and (shape[1] == 3) != (shape[3] == 3):
        return (["NCHW"] if shape[1] == 3 else ["NHWC"]), "signature"
    return list(LAYOUTS), "tried"


def _ranges(port: formats.Port, pins: Pins) -> tuple[list[str], str]:
    if pins.input_range:
        return [pins.input_range], "pinned"
    if port.dtype == "uint8" and port.quantization is None:
        return ["byte"], "signature"
    return list(INPUT_RANGES), "tried"


def _spatial(shape: list[int | None] | None, layout: str) -> tuple[int | None, int | None]:
    if not shape or len(shape) != 4:
        return None, None
    return (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])


def _feed(images: np.ndarray, candidate: _Candidate, port: formats.Port, ckpt: Checkpoint) -> np.ndarray:
    """The referee's normalized NCHW images as this candidate says the artifact wants them."""
    x = np.asarray(images, dtype=np.float64)
    if candidate.input_range != "normalized":
        mean = np.asarray(ckpt.preprocessing.mean, dtype=np.float64).reshape(1, 3, 1, 1)
        std = np.asarray(ckpt.preprocessing.std, dtype=np.float64).reshape(1, 3, 1, 1)
        x = x * std + mean
        if candidate.input_range == "byte":
            x = x * 255.0
    if candidate.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)
    dtype = np.dtype(port.dtype) if port.dtype not in ("unknown", "bfloat16") else np.dtype(np.float32)
    if port.quantization is not None:
        scale, zero = port.quantization
        x = np.round(x / scale) + zero
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        x = np.clip(np.round(x), info.min, info.max)
    return np.ascontiguousarray(x.astype(dtype))


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _run_batches(opened: formats.Opened, port: formats.Port, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every image through the artifact, in chunks of its static batch (the last one padded, the padding dropped)."""
    assert opened.run is not None
    chunks: list[dict[str, np.ndarray]] = []
    for part, given in artifact_judging.static_batches(port, x):
        out = opened.run({port.name: part})
        chunks.append({name: np.asarray(v)[:given] if np.ndim(v) and np.shape(v)[0] == len(part) else np.asarray(v)
                       for name, v in out.items()})
    quant = {p.name: p.quantization for p in opened.outputs if p.quantization is not None}
    merged = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
    return {name: ((v.astype(np.float64) - quant[name][1]) * quant[name][0]) if name in quant else v
            for name, v in merged.items()}


def _targets(referee: parity_rule.Referee) -> dict[str, np.ndarray]:
    targets = {}
    if "logits" in referee.features:
        targets["logits"] = referee.features["logits"]
        targets["probabilities"] = artifact_judging.softmax(referee.features["logits"])
    if "pooled" in referee.features:
        targets["pooled"] = referee.features["pooled"]
    return targets


def _output_kinds(port: formats.Port, value: np.ndarray, ckpt: Checkpoint, pins: Pins) -> tuple[list[str], str]:
    """The output kinds an output could be, and how that was found."""
    width = value.shape[1] if value.ndim == 2 else None
    fitting = [k for k in OUTPUT_KINDS
               if (k == "pooled" and width == ckpt.config.dims[-1])
               or (k != "pooled" and ckpt.config.num_classes and width == ckpt.config.num_classes)]
    if pins.output:
        return ([pins.output] if pins.output in fitting else []), "pinned"
    name = port.name.lower()
    if port.op.lower() == "softmax" or "prob" in name or "softmax" in name:
        said = "probabilities"
    elif name in _OUTPUT_NAMES:
        said = _OUTPUT_NAMES[name]
    else:
        return fitting, "tried"
    return ([said] if said in fitting else []), "signature"


def _score(outputs: dict[str, np.ndarray], opened: formats.Opened, ckpt: Checkpoint, pins: Pins,
           targets: dict[str, np.ndarray]) -> list[tuple[float, str, str, str]]:
    """(scale-aware error, output name, kind, how) for every output and kind it could be."""
    ports = {p.name: p for p in opened.outputs}
    scored = []
    for name, value in outputs.items():
        port = ports.get(name, formats.Port(name, None, str(value.dtype)))
        kinds, how = _output_kinds(port, value, ckpt, pins)
        for kind in kinds:
            if kind in targets and value.shape == targets[kind].shape:
                error = (parity_rule.scale_aware_error(value, targets[kind]) if np.all(np.isfinite(value))
                         else float("inf"))
                scored.append((error, name, kind, how))
    return scored


# ------------------------------------------------------------------ the check

def check(probe: Probe, ckpt: Checkpoint, referee: parity_rule.Referee, pins: Pins | None = None,
          tolerance: parity_rule.Tolerance | None = None, say: Callable[[str], None] | None = None, *,
          localise: bool = True) -> parity_rule.Verdict:
    """Run the artifact on the referee's images, find its conventions and judge it at its precision.
    ``localise=False``: the final output only, without reading the artifact's intermediate tensors."""
    pins = pins or Pins()
    say = say or (lambda message: None)
    precision = pins.precision or probe.precision
    result = parity_rule.Verdict(probe.path.name, "artifact", precision, "pass")
    row: dict[str, Any] = {"path": str(probe.path), "format": probe.format, "runtime": probe.runtime,
                           "precision": precision, "precision_how": probe.precision_how, "conventions": {},
                           "status": "pass", "first_divergence": None, "localisation": None, "headroom": None,
                           "metrics": None}
    result.artifact = row
    started = time.perf_counter()
    try:
        if probe.unavailable:
            return _unavailable(result, probe.unavailable, say)
        opened = _open(probe.path)
        if opened.unavailable:
            return _unavailable(result, opened.unavailable, say)
        say(f"running {probe.path.name} ({probe.runtime})")
        try:
            formats.start(probe.path, opened)
        except MissingDependencyError as exc:
            return _unavailable(result, str(exc), say)
        row["runtime"] = opened.runtime
        if opened.unavailable:
            return _unavailable(result, opened.unavailable, say)
        _judge(result, opened, ckpt, referee, pins, (tolerance, localise))
    except BadInputError:
        raise
    except Exception as exc:  # a runtime that crashes on the file: the artifact fails to run, with the cause
        result.status, result.reason = "error", f"{type(exc).__name__}: {str(exc).strip()[:500]}"
        say(result.reason)
    finally:
        result.seconds = time.perf_counter() - started
        row["status"] = result.status
        found = row["conventions"]
        row["conventions"] = {k: found[k] for k in _CONVENTIONS if k in found}
    return result


def _unavailable(result: parity_rule.Verdict, reason: str, say: Callable[[str], None]) -> parity_rule.Verdict:
    result.status, result.reason = "unavailable", reason
    say(f"{result.name}: {reason}")
    return result


def _judge(result: parity_rule.Verdict, opened: formats.Opened, ckpt: Checkpoint, referee: parity_rule.Referee,
           pins: Pins, judging: tuple[parity_rule.Tolerance | None, bool]) -> None:
    row = result.artifact
    assert row is not None
    conventions = row["conventions"]
    if len(opened.inputs) != 1:
        result.status = "error"
        result.reason = f"the artifact takes {len(opened.inputs)} inputs; an image classifier takes one"
        return
    port = opened.inputs[0]
    shape = port.shape
    if shape is not None and len(shape) != 4:
        result.status, result.reason = "error", f"its input {port.name!r} has rank {len(shape)}, not 4 (an image batch)"
        return
    layouts, layout_how = _layouts(port, pins)
    ranges, range_how = _ranges(port, pins)
    size_problem = _size(conventions, port, layouts, ckpt, referee)
    if size_problem is not None:
        result.status, result.reason = size_problem
        return
    batch = shape[0] if shape else None
    conventions["batch"] = _choice(batch, "signature" if shape else "tried",
                                   note=("images run one at a time" if batch == 1 else
                                         f"images run {batch} at a time" if batch else "all images at once"))
    conventions["input_dtype"] = _choice(port.dtype, "signature", **(
        {"quantization": {"scale": port.quantization[0], "zero_point": port.quantization[1]}}
        if port.quantization else {}))
    referee = _referee_for_input(referee, ckpt, port, conventions)
    targets = _targets(referee)
    tried = []
    for layout, input_range in itertools.product(layouts, ranges):
        candidate = _Candidate(layout, input_range)
        height, width = _spatial(shape, layout)
        if (height or referee.images.shape[2]) != referee.images.shape[2] or \
                (width or referee.images.shape[3]) != referee.images.shape[3]:
            candidate.error = f"input shape {shape} does not take {layout} images"
        else:
            feed = _feed(referee.images, candidate, port, ckpt)
            try:
                candidate.outputs = _run_batches(opened, port, feed)
            except Exception as exc:
                candidate.error = _one_line(exc)
                if batch is None and len(feed) > 1:
                    # Exporters declare a dynamic batch and still bake batch 1 into a Reshape: such a file runs
                    # only one image at a time, which the report says, rather than failing on our batching.
                    single = dataclasses.replace(port, shape=[1, *(shape[1:] if shape else [None] * 3)])
                    try:
                        candidate.outputs = _run_batches(opened, single, feed)
                    except Exception:
                        pass
                    else:
                        port, batch = single, 1
                        conventions["batch"] = _choice(1, "tried", note=(
                            f"declared dynamic, but a batch of {len(feed)} fails ({candidate.error}): images run "
                            "one at a time"))
                        candidate.error = ""
        tried.append(candidate)
    ranked = [(score, c) for c in tried if c.outputs is not None
              for score in _score(c.outputs, opened, ckpt, pins, targets)]
    if not ranked:
        errors = "; ".join(f"{c.layout}/{c.input_range}: {c.error}" for c in tried if c.error)
        widths = {n: list(v.shape) for c in tried if c.outputs for n, v in c.outputs.items()}
        result.status = "error" if errors and not widths else "fail"
        result.reason = (f"no run of the artifact gave an output the checkpoint's final feature fits"
                         f" (outputs: {widths or 'none'}{'; ' + errors if errors else ''})")
        return
    (error, output_name, kind, output_how), chosen = min(ranked, key=lambda item: item[0][0])
    _record_conventions(conventions, ranked, tried, (layouts, layout_how), (ranges, range_how), chosen)
    conventions["output"] = _choice(kind, output_how, **({"candidates": _candidates(
        [(s[2], s[0]) for s, c in ranked if c is chosen and s[1] == output_name])} if output_how == "tried" else {}),
        tensor=output_name)
    conventions["classes"] = _choice(int(chosen.outputs[output_name].shape[1]) if kind != "pooled" else None,
                                     "signature" if opened.outputs and all(
                                         p.shape and p.shape[-1] for p in opened.outputs) else "tried")
    feed = _feed(referee.images, chosen, port, ckpt)
    artifact_judging.judge(result, ckpt, referee, artifact_judging.ChosenRun(
        Path(row["path"]), opened.format, chosen.outputs, output_name, kind, feed, port, judging[1]), judging[0])


def _size(conventions: dict[str, Any], port: formats.Port, layouts: list[str], ckpt: Checkpoint,
          referee: parity_rule.Referee) -> tuple[str, str] | None:
    """The static image size, checked against the checkpoint's preprocessing and the referee's images."""
    sizes = {_spatial(port.shape, layout) for layout in layouts} - {(None, None)}
    expected, given = ckpt.preprocessing.input_size, referee.images.shape[-1]
    if len(sizes) != 1 or None in next(iter(sizes)):
        conventions["image_size"] = _choice(None, "signature", note=f"dynamic; run at {given}")
        return None
    height, width = next(iter(sizes))
    conventions["image_size"] = _choice(height if height == width else [height, width], "signature")
    if (height, width) == (given, given):
        if height != expected:
            conventions["image_size"]["note"] = (f"differs from the checkpoint's preprocessing input size {expected}; "
                                                 f"the referee's images are {given}")
        return None
    if (height, width) == (expected, expected):
        return "error", (f"the artifact takes {height}x{width} images and the referee's are {given}x{given}: "
                         f"build the referee at {height}")
    return "fail", (f"the artifact takes {height}x{width} images, the checkpoint's preprocessing says "
                    f"{expected}x{expected}")


def _referee_for_input(referee: parity_rule.Referee, ckpt: Checkpoint, port: formats.Port,
                       conventions: dict[str, Any]) -> parity_rule.Referee:
    """An integer input sees rounded pixels: a float artifact is judged against the referee of those pixels."""
    if not np.issubdtype(np.dtype(port.dtype if port.dtype not in ("unknown", "bfloat16") else "float32"),
                         np.integer) or port.quantization is not None:
        return referee
    mean = np.asarray(ckpt.preprocessing.mean).reshape(1, 3, 1, 1)
    std = np.asarray(ckpt.preprocessing.std).reshape(1, 3, 1, 1)
    pixels = np.clip(np.round((referee.images * std + mean) * 255.0), 0, 255)
    images = ((pixels / 255.0 - mean) / std).astype(np.float32)
    conventions["input_dtype"]["note"] = "the referee is rebuilt on the byte-rounded images the artifact sees"
    return parity_rule.Referee.build(ckpt, images, tuple(referee.baselines))


def _candidates(pairs: list[tuple[str, float]]) -> list[dict[str, Any]]:
    best: dict[str, float] = {}
    for value, error in pairs:
        best[value] = min(error, best.get(value, float("inf")))
    return [{"value": value, "scale_aware_error": error} for value, error in best.items()]


def _record_conventions(conventions: dict[str, Any], ranked: list[Any], tried: list[_Candidate],
                        layouts: tuple[list[str], str], ranges: tuple[list[str], str], chosen: _Candidate) -> None:
    for key, (_values, how), attribute in (("layout", layouts, "layout"), ("input_range", ranges, "input_range")):
        entry = _choice(getattr(chosen, attribute), how)
        if how == "tried":
            entry["candidates"] = _candidates([(getattr(c, attribute), s[0]) for s, c in ranked])
            for c in tried:
                if c.error and getattr(c, attribute) not in {e["value"] for e in entry["candidates"]}:
                    entry["candidates"].append({"value": getattr(c, attribute), "scale_aware_error": None,
                                                "error": c.error})
        conventions[key] = entry


# ------------------------------------------------------------------ as a registered runner

class ArtifactRunner(Runner):
    """A file made anywhere, run by ``check`` against a referee of the images it is given (the registry's
    "artifact" entry: ``convert --verify``, the ONNX import check, anything that opens a file by format)."""

    verdict: parity_rule.Verdict | None = None

    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        assert self.file is not None, "this runner opens a file"
        ckpt = self.checkpoint
        with self.context.phase("referee"):
            referee = parity_rule.Referee.build(ckpt, images, (precision,))
        with self.context.phase("forward"):
            self.verdict = check(probe(self.file.path), ckpt, referee)
        if self.verdict.status == "unavailable":
            raise MissingDependencyError(self.verdict.reason)
        produced = dict(self.verdict.figures.get("produced", {}))
        if not produced:
            raise RuntimeError(self.verdict.reason or "the artifact produced nothing to compare")
        return {**produced, parity_rule.DETAIL_KEY: np.asarray(self.verdict.reason)}


RECORDS = (
    RunnerRecord("artifact", "artifact", "a deployment artifact in its own runtime (converters/runners/artifact.py)",
                 worker="artifact", precisions=("float32", "float16", "bfloat16"),
                 # .keras is not claimed by format: the toolkit's own Keras files are checkpoints (a
                 # .weights.h5 has no model), run by the Keras reference; check() runs a .keras model as given.
                 opens=tuple(f for f in ARTIFACT_FORMATS if f != "keras")),
)

