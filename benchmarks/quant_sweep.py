"""The quantization rule's sweep: known-good and known-bad int8 quantizations made by the real tools, each judged
against the float64 PyTorch referee stage by stage, within margins of the int8 yardstick measured in the same run
(convnextv2.reference.quantization_rule: int8_yardstick, judge_quantized).

    python -m benchmarks.quant_sweep [--variants atto,tiny] [--weights fixture,trained-like] [--batch 8]
        [--calibration 16] [--json benchmarks/results/quant_sweep.json] [--docs docs/parity.md]
        [--nncf-site /tmp/nncf-site] [--from-json FILE]

Every artifact starts from our ONNX export with every stage as an output (converters/onnx/export.py,
``features=True``), so each quantized graph exposes stem, stage1..4, pooled and logits:

known good   onnxruntime quantize_static, QDQ, per-channel int8 weights on Conv/MatMul/Gemm, uint8 or symmetric
             int8 activations (MinMax on calibration images distinct from the judged ones; GRN's sum of squares,
             a MatMul with a ones matrix in our export, left in float); onnxruntime quantize_dynamic (MatMul/Conv
             weights int8, per channel); LiteRT dynamic-range int8 (TFLiteConverter on the Keras reference,
             Optimize.DEFAULT); NNCF int8 (nncf.quantize on the OpenVINO model, model_type TRANSFORMER, GRN's
             MatMul ignored) when nncf imports (``--nncf-site``: a site dir of its own, installed --no-deps).
known bad    the same QDQ with per-tensor weights; with LayerNormalization quantized too; with GRN's ops
             (its sum of squares, Sqrt, ReduceMean, Div) quantized; with onnxruntime's default op set (which
             quantizes LayerNormalization and GRN's MatMul); calibrated on one image; int8 activations calibrated
             on images at a quarter of their range (a clipped range); LiteRT full integer (representative
             dataset, int8 builtins only); NNCF with its defaults.

Weights: fixtures/trained_like.py (order-1 pre-activations, per-channel scale spread) by default; the plain
fixture (``--weights fixture,trained-like``, atto) discriminates nothing but the clipped range. Per checkpoint the
int8 yardstick is measured on the same images; each artifact's gap to it (yardstick SQNR minus the artifact's,
per stage) is what the margins separate: ``separation`` in the JSON gives, per metric, the largest gap of a
known-good artifact and the smallest largest-gap of a known-bad one. ``--from-json`` re-judges the recorded
metrics under the current THRESHOLDS (measuring the yardstick where a record lacks it) and re-renders the table.

Each artifact runs as written (onnxruntime with graph optimisations off, LiteRT's interpreter, OpenVINO's CPU
plugin with the f32 hint). The table goes into docs/parity.md between the markers of "Quantized artifacts".
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.reference import parity_rule as rule
from convnextv2.reference import quantization_rule as qrule

ROOT = Path(__file__).resolve().parent.parent
JSON_PATH = ROOT / "benchmarks" / "results" / "quant_sweep.json"
DOCS_PATH = ROOT / "docs" / "parity.md"
TABLE_BEGIN = "<!-- quant-sweep table: python -m benchmarks.quant_sweep -->"
TABLE_END = "<!-- end quant-sweep table -->"
SIZE = 224
JUDGED_SEED = rule.DEFAULT_SEED
CALIBRATION_SEED = 1000  # calibration images distinct from the judged ones
WEIGHTS = ("fixture", "trained-like")
DEFAULT_WEIGHTS = ("trained-like",)  # the plain fixture discriminates nothing but the clipped range
YARDSTICK_KEYS = ("yardstick_sqnr_db", "yardstick_cosine", "yardstick_top1_agreement", "yardstick_top5_agreement")
Say = Callable[[str], None]
# name -> (expected, what it is)
ARTIFACTS: dict[str, tuple[str, str]] = {
    "ort-qdq-u8": ("good", "quantize_static QDQ, per-channel int8 weights, uint8 activations"),
    "ort-qdq-s8": ("good", "quantize_static QDQ, per-channel int8 weights, symmetric int8 activations"),
    "ort-dynamic": ("good", "quantize_dynamic, MatMul/Conv weights int8 per channel"),
    "litert-dynamic": ("good", "TFLiteConverter, Optimize.DEFAULT, int8 weights (dynamic range)"),
    "nncf-int8": ("good", "nncf.quantize, model_type TRANSFORMER, GRN's sum-of-squares MatMul ignored"),
    "ort-qdq-per-tensor": ("bad", "as ort-qdq-u8 with per-tensor weights"),
    "ort-qdq-layernorm": ("bad", "as ort-qdq-u8 with LayerNormalization quantized"),
    "ort-qdq-grn": ("bad", "as ort-qdq-u8 with GRN's sum of squares, Sqrt, ReduceMean and Div quantized"),
    "ort-qdq-default-ops": ("bad", "quantize_static's default op set (LayerNorm, GRN's MatMul, ...)"),
    "ort-qdq-1-image": ("bad", "as ort-qdq-u8 calibrated on one image"),
    "ort-qdq-s8-clipped": ("bad", "as ort-qdq-s8 calibrated on images at 1/4 of their range"),
    "litert-int8": ("bad", "TFLiteConverter full integer (representative dataset, int8 builtins): LayerNorm "
                    "and GRN arithmetic in int8"),
    "nncf-int8-default": ("bad", "nncf.quantize with its defaults: GRN's sum-of-squares MatMul in int8"),
}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _checkpoint(variant: str, weights: str) -> Any:
    from convnextv2.fixtures import make_checkpoint
    from convnextv2.fixtures.trained_like import trained_like

    ckpt = make_checkpoint(variant, seed=0, fmt="canonical")
    return trained_like(ckpt) if weights == "trained-like" else ckpt


# ------------------------------------------------------------------ onnxruntime's quantizer

class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over seeded images, one image per call."""

    def __init__(self, images: np.ndarray, input_name: str = "pixel_values") -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(
            [{input_name: images[i:i + 1]} for i in range(len(images))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def grn_nodes(model: Any) -> tuple[list[str], list[str]]:
    """Our export's GRN: the sum of squares over H x W is a MatMul of a ones matrix with x*x, then Sqrt, a
    Reshape, ReduceMean (the mean over channels) and Div. Returns (the sum-of-squares MatMuls, every GRN node
    of those op types)."""
    made_by = {out: node for node in model.graph.node for out in node.output}
    matmuls = [node.name for node in model.graph.node
               if node.op_type == "MatMul" and any(name.startswith("ones") for name in node.input)]
    others = []
    for node in model.graph.node:
        if node.op_type not in ("ReduceMean", "Div"):
            continue
        reshape = made_by.get(node.input[0])
        if reshape is not None and reshape.op_type == "Reshape" and made_by.get(reshape.input[0]) is not None \
                and made_by[reshape.input[0]].op_type == "Sqrt":
            others += [node.name, made_by[reshape.input[0]].name]
    return matmuls, matmuls + sorted(set(others))


def ort_static(source: Path, target: Path, calibration: np.ndarray, *, per_channel: bool = True,
               activations: str = "uint8", op_types: list[str] | None = None, quantize_grn: bool = False) -> None:
    """onnxruntime's quantize_static (QDQ) on ``source``; ``op_types`` None: its default op set."""
    import onnx
    from onnxruntime import quantization as oq

    model = onnx.load(str(source))
    grn_matmuls, grn_all = grn_nodes(model)
    options: dict[str, Any] = {}
    if op_types is not None:
        types = list(op_types)
        if quantize_grn:
            types += ["Sqrt", "ReduceMean", "Div"]
            options["nodes_to_quantize"] = [n.name for n in model.graph.node if n.op_type in op_types] + grn_all
        else:
            options["nodes_to_exclude"] = grn_matmuls
        options["op_types_to_quantize"] = types
    activation_type = oq.QuantType.QUInt8 if activations == "uint8" else oq.QuantType.QInt8
    # Asymmetric int8 activations are uint8 shifted by 128 (the same numbers): int8 means symmetric here.
    extra = {"ActivationSymmetric": activations == "int8"}
    oq.quantize_static(str(source), str(target), _Calibration(calibration), quant_format=oq.QuantFormat.QDQ,
                       per_channel=per_channel, activation_type=activation_type, weight_type=oq.QuantType.QInt8,
                       extra_options=extra, **options)


def ort_dynamic(source: Path, target: Path) -> None:
    from onnxruntime import quantization as oq

    oq.quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Conv"], per_channel=True,
                        weight_type=oq.QuantType.QInt8)


def _ort_runner(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    from convnextv2.converters.onnx.session import ort_session, run_ort

    session = ort_session(path, threads=2, optimise=False)
    return lambda images: run_ort(session, images)


# ------------------------------------------------------------------ LiteRT and NNCF

def litert_int8(ckpt: Any, target: Path, calibration: np.ndarray | None) -> None:
    """The Keras reference's feature model through TFLiteConverter with Optimize.DEFAULT: with ``calibration``
    as the representative dataset and int8 builtins only (full integer), else int8 weights only."""
    from convnextv2.converters import litert
    from convnextv2.reference.keras_model import SPATIAL_FEATURES, build_keras, feature_model, keras, tf

    model = build_keras(ckpt.config, ckpt.model_tensors(), dtype="float32")
    outputs = feature_model(model)

    def serve(pixel_values: Any) -> dict[str, Any]:
        result = outputs(tf.transpose(pixel_values, (0, 2, 3, 1)), training=False)
        return {name: tf.transpose(value, (0, 3, 1, 2)) if name in SPATIAL_FEATURES else value
                for name, value in result.items()}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(litert.SIGNATURE, serve, input_signature=[
        tf.TensorSpec((1, 3, SIZE, SIZE), tf.float32, name=litert.INPUT_NAME)])
    with tempfile.TemporaryDirectory(prefix="quant-sweep-litert-") as tmp:
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[litert.SIGNATURE])
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if calibration is not None:
            converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        target.write_bytes(converter.convert())


def _litert_runner(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    from convnextv2.converters import litert

    interp = litert.interpreter(path, threads=2)
    # The file is converted at batch 1: the images one at a time.
    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        parts = [litert.run(interp, images[i:i + 1]) for i in range(len(images))]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return run


def nncf_int8(source: Path, target: Path, calibration: np.ndarray, site: str | None, defaults: bool = False) -> None:
    """nncf.quantize on the OpenVINO model of ``source``: with its defaults, or as a transformer with GRN's
    sum-of-squares MatMuls (a ones matrix times x*x) left in float."""
    if site and site not in sys.path:
        sys.path.insert(0, site)  # nncf's pins clash with ours: a site dir of its own, installed --no-deps
    import nncf
    import openvino as ov

    model = ov.convert_model(str(source))
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    options: dict[str, Any] = {}
    if not defaults:
        grn = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul" and any(
            "ones" in port.get_source_output().get_node().get_friendly_name() for port in op.inputs())]
        options = {"model_type": nncf.ModelType.TRANSFORMER, "ignored_scope": nncf.IgnoredScope(names=grn)}
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration), **options)
    ov.save_model(quantized, str(target), compress_to_fp16=False)


def _openvino_runner(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    from convnextv2.converters import openvino

    compiled, _ = openvino.compile_ir(path, "float32", threads=2)
    return lambda images: openvino.run(compiled, images)


# ------------------------------------------------------------------ one checkpoint

def _make(name: str, ckpt: Any, source: Path, work: Path, calibration: np.ndarray,
          nncf_site: str | None) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    conv = ["Conv", "MatMul", "Gemm"]
    if name.startswith("litert"):
        path = work / f"{name}.tflite"
        litert_int8(ckpt, path, calibration if name == "litert-int8" else None)
        return _litert_runner(path)
    if name.startswith("nncf"):
        path = work / f"{name}.xml"
        nncf_int8(source, path, calibration, nncf_site, defaults=name.endswith("default"))
        return _openvino_runner(path)
    path = work / f"{name}.onnx"
    static = {
        "ort-qdq-u8": {"op_types": conv},
        "ort-qdq-s8": {"op_types": conv, "activations": "int8"},
        "ort-qdq-per-tensor": {"op_types": conv, "per_channel": False},
        "ort-qdq-layernorm": {"op_types": [*conv, "LayerNormalization"]},
        "ort-qdq-grn": {"op_types": conv, "quantize_grn": True},
        "ort-qdq-default-ops": {"op_types": None},
    }
    if name in static:
        ort_static(source, path, calibration, **static[name])
    elif name == "ort-qdq-1-image":
        ort_static(source, path, calibration[:1], op_types=conv)
    elif name == "ort-qdq-s8-clipped":
        ort_static(source, path, calibration * np.float32(0.25), op_types=conv, activations="int8")
    elif name == "ort-dynamic":
        ort_dynamic(source, path)
    else:
        raise ValueError(f"unknown artifact {name!r}")
    return _ort_runner(path)


def sweep_checkpoint(variant: str, weights: str, artifacts: list[str], batch: int, calibration_count: int,
                     nncf_site: str | None, say: Say) -> list[dict[str, Any]]:
    from convnextv2.converters.onnx import export

    ckpt = _checkpoint(variant, weights)
    images = rule.seeded_images(batch, SIZE, JUDGED_SEED)
    calibration = rule.seeded_images(calibration_count, SIZE, CALIBRATION_SEED)
    start = time.perf_counter()
    referee = rule.Referee.build(ckpt, images, precisions=())
    yardstick = qrule.int8_yardstick(ckpt, images)
    yard = qrule.measure(yardstick, referee)
    say(f"{variant}/{weights}: referee and int8 yardstick {time.perf_counter() - start:.1f}s; yardstick SQNR "
        + " / ".join(f"{v:.1f}" for v in yard["sqnr_db"].values()))
    records = [_yardstick_record(variant, weights, yard)]
    with tempfile.TemporaryDirectory(prefix="quant-sweep-") as tmp:
        source = Path(tmp) / "float.onnx"
        export.write(ckpt, source, size=SIZE, features=True)
        for name in artifacts:
            start = time.perf_counter()
            record: dict[str, Any] = {"variant": variant, "weights": weights, "artifact": name,
                                      "expected": ARTIFACTS[name][0], "what": ARTIFACTS[name][1]}
            try:
                run = _make(name, ckpt, source, Path(tmp), calibration, nncf_site)
                produced = {k: v for k, v in run(images).items() if k in rule.FEATURES}
            except Exception as exc:  # a tool missing or failing here is reported, the sweep goes on
                record.update(status="unavailable", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                say(f"{variant}/{weights} {name}: unavailable ({record['reason']})")
                records.append(record)
                continue
            judged = qrule.judge_quantized(produced, referee, yardstick)
            record.update(status=judged.status, first_failing=judged.first_failing, metrics=judged.metrics,
                          seconds=round(time.perf_counter() - start, 1))
            records.append(record)
            say(f"{variant}/{weights} {name}: {judged.status} {judged.first_failing or ''} "
                f"({record['seconds']}s) {judged.reason}")
            del run
            gc.collect()
    return records


def _yardstick_record(variant: str, weights: str, yard: dict[str, Any]) -> dict[str, Any]:
    return {"variant": variant, "weights": weights, "artifact": "int8-yardstick", "expected": "yardstick",
            "what": "PyTorch float64 reference, per-channel int8 weights, uint8 inputs at every Conv/Linear",
            "status": "yardstick", "metrics": yard}


def attach_yardsticks(records: list[dict[str, Any]], batch: int, say: Say, again: bool = False,
                      ) -> list[dict[str, Any]]:
    """Records of an older sweep without the yardstick (every record with ``again``): measure it per checkpoint
    (same images) and attach it."""
    measured: dict[tuple[str, str], dict[str, Any]] = {}
    if again:
        records = [r for r in records if r["artifact"] != "int8-yardstick"]
    for r in records:
        if r["status"] not in ("pass", "fail") or ("yardstick_sqnr_db" in r["metrics"] and not again):
            continue
        key = (r["variant"], r["weights"])
        if key not in measured:
            ckpt = _checkpoint(*key)
            images = rule.seeded_images(batch, SIZE, JUDGED_SEED)
            measured[key] = qrule.measure(qrule.int8_yardstick(ckpt, images),
                                          rule.Referee.build(ckpt, images, precisions=()))
            say(f"{key[0]}/{key[1]}: yardstick measured")
        yard = measured[key]
        r["metrics"].update(zip(YARDSTICK_KEYS, (yard["sqnr_db"], yard["cosine"], yard["top1_agreement"],
                                                 yard["top5_agreement"]), strict=True))
    known = {(r["variant"], r["weights"]) for r in records if r["artifact"] == "int8-yardstick"}
    extra = [_yardstick_record(*key, yard) for key, yard in measured.items() if key not in known]
    return extra + records


# ------------------------------------------------------------------ tables

def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| size | weights | artifact | expected | SQNR dB stem / s1 / s2 / s3 / s4 / pooled / logits | "
             "largest gap to the yardstick (dB) | worst cosine | top-1 | top-5 | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["expected"] != "yardstick"):
        if r["status"] == "unavailable":
            lines.append(f"| {r['variant']} | {r['weights']} | {r['artifact']} | {r['expected']} | "
                         f"not available: {r['reason']} | | | | | |")
            continue
        m = r["metrics"]
        sqnr = " / ".join(_fmt(m["sqnr_db"].get(s), 1) for s in rule.FEATURES)
        worst_cos = min(v for v in m["cosine"].values() if v is not None)
        if r["expected"] == "yardstick":
            gap, verdict = "—", "(the yardstick)"
        else:
            status, first = rejudge(m)
            stage, db = largest_gap(m)
            gap, verdict = f"{db:.1f} at {stage}", status + (f" at {first}" if first else "")
        lines.append(f"| {r['variant']} | {r['weights']} | {r['artifact']} | {r['expected']} | {sqnr} | {gap} | "
                     f"{worst_cos:.4f} | {_fmt(m['top1_agreement'], 2)} | {_fmt(m['top5_agreement'], 2)} | "
                     f"{verdict} |")
    return "\n".join(lines)


def _stage_metrics(metrics: dict[str, Any], name: str, prefix: str = "") -> dict[str, float | None]:
    got = {"sqnr_db": metrics[prefix + "sqnr_db"].get(name), "cosine": metrics[prefix + "cosine"].get(name)}
    if name == "logits":
        got.update(top1_agreement=metrics[prefix + "top1_agreement"],
                   top5_agreement=metrics[prefix + "top5_agreement"])
    return got


def largest_gap(metrics: dict[str, Any]) -> tuple[str, float]:
    """The stage where the artifact's SQNR falls furthest below the yardstick's, and by how many dB."""
    gaps = {name: metrics["yardstick_sqnr_db"][name] - db for name, db in metrics["sqnr_db"].items()
            if db is not None and metrics["yardstick_sqnr_db"].get(name) is not None}
    worst = max(gaps, key=lambda name: gaps[name])
    return worst, gaps[worst]


def rejudge(metrics: dict[str, Any], thresholds: dict[str, float] | None = None) -> tuple[str, str | None]:
    """The verdict of recorded metrics under ``thresholds`` (default the current THRESHOLDS; the rule's own
    stage_problems), so that ``--from-json`` shows what the rule decides now."""
    for name in rule.FEATURES:
        if metrics["sqnr_db"].get(name) is None:
            continue
        if qrule.stage_problems(name, _stage_metrics(metrics, name), _stage_metrics(metrics, name, "yardstick_"),
                                thresholds):
            return "fail", name
    return "pass", None


def _gaps(metrics: dict[str, Any]) -> dict[str, float]:
    """Per metric, the artifact's largest shortfall against the yardstick over its stages: SQNR in dB, the
    cosine distance (1 - cosine) in dB above the yardstick's, top-1 / top-5 agreement below the yardstick's."""
    sqnr = largest_gap(metrics)[1]
    cos = max(10 * np.log10(max(1 - c, 1e-20) / max(1 - metrics["yardstick_cosine"][n], 1e-20))
              for n, c in metrics["cosine"].items() if c is not None)
    found = {"sqnr_db": float(sqnr), "cosine_db": float(cos)}
    for key in ("top1_agreement", "top5_agreement"):
        if metrics.get(key) is not None:
            found[key] = metrics["yardstick_" + key] - metrics[key]
    return found


def separation(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: the largest shortfall of any known-good artifact (a margin must be at least this) and, per
    known-bad artifact, its largest shortfall (a margin below it catches it on that metric)."""
    found: dict[str, Any] = {"good_worst": {}, "bad": {}}
    for r in records:
        if r["status"] not in ("pass", "fail"):
            continue
        gaps = _gaps(r["metrics"])
        if r["expected"] == "good":
            for key, gap in gaps.items():
                found["good_worst"][key] = round(max(found["good_worst"].get(key, -np.inf), gap), 3)
        else:
            found["bad"][f"{r['variant']}/{r['weights']}/{r['artifact']}"] = {k: round(v, 3) for k, v in gaps.items()}
    return found


def write_docs(path: Path, text: str) -> bool:
    """Replace the table between the markers in ``path``; False when the markers are not there."""
    content = path.read_text()
    if TABLE_BEGIN not in content or TABLE_END not in content:
        return False
    head, rest = content.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    path.write_text(f"{head}{TABLE_BEGIN}\n{text}\n{TABLE_END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quant_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="atto,tiny")
    parser.add_argument("--weights", default=",".join(DEFAULT_WEIGHTS), help="fixture, trained-like")
    parser.add_argument("--fixture-variants", default="atto",
                        help="sizes at which the plain fixture weights are swept (they do not discriminate)")
    parser.add_argument("--artifacts", default=",".join(ARTIFACTS))
    parser.add_argument("--batch", type=int, default=rule.DEFAULT_BATCH)
    parser.add_argument("--calibration", type=int, default=16, help="calibration images")
    parser.add_argument("--nncf-site", default="/tmp/nncf-site", help="where nncf was installed --no-deps")
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    parser.add_argument("--docs", type=Path, default=DOCS_PATH)
    parser.add_argument("--from-json", type=Path, help="re-judge and re-render the table from a previous run")
    parser.add_argument("--measure-yardstick", action="store_true",
                        help="with --from-json: measure the yardstick again (its calibration changed)")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        records = attach_yardsticks(saved["records"], args.batch, say, args.measure_yardstick)
        header = {k: saved[k] for k in ("machine", "seconds", "size", "batch", "calibration_images") if k in saved}
    else:
        records = []
        started = time.perf_counter()
        for weights in _csv(args.weights):
            variants = _csv(args.fixture_variants) if weights == "fixture" else _csv(args.variants)
            for variant in variants:
                records += sweep_checkpoint(variant, weights, _csv(args.artifacts), args.batch, args.calibration,
                                            args.nncf_site, say)
        header = {"machine": {"python": platform.python_version(), "platform": platform.platform()},
                  "seconds": round(time.perf_counter() - started, 1), "size": SIZE, "batch": args.batch,
                  "calibration_images": args.calibration}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        **header, "yardstick_calibration": {"seed": qrule.CALIBRATION_SEED, "images": qrule.CALIBRATION_IMAGES},
        "thresholds": qrule.THRESHOLDS, "separation": separation(records), "records": records}, indent=1) + "\n")
    text = table(records)
    print(text)
    if args.docs and args.docs.is_file() and not write_docs(args.docs, text):
        say(f"{args.docs}: no quant-sweep markers; the table was not written there")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
