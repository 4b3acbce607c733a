"""Parity reports: terminal table, and files chosen by extension — ``.json`` (schemas/parity-report.schema.json),
``.md`` (CI job summaries), ``.xml`` (JUnit: one test suite per runtime, one test case per feature),
``.html`` (table plus an inline SVG of the per-stage error of every runtime; no dependency) and ``.png``
(the same chart, drawn with Pillow)."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from convnextv2.converters.publishing import atomic_file
from convnextv2.parity_tests.harness import FEATURES, ParityReport, Verdict
from convnextv2.reference.errors import BadInputError

REPORT_SUFFIXES = (".json", ".md", ".xml", ".html", ".png")
SCHEMA_FILE = Path(__file__).with_name("schemas") / "parity-report.schema.json"
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _label(result: Verdict) -> str:
    return result.name if result.dtype == "float32" else f"{result.name} ({result.dtype})"


def _verdict(result: Verdict) -> str:
    if result.status == "fail":
        return f"FAIL (first diverges at {result.first_divergence})"
    if result.status == "unavailable" and result.artifact is not None:
        return "NOT CHECKED (cannot run here)"
    return {"pass": "pass", "error": "ERROR", "unavailable": "not available"}[result.status]


def _summary_line(report: ParityReport) -> str:
    ran = [r for r in report.runtimes if r.status != "unavailable"]
    failed = report.failures() + report.unchecked()
    if report.passed:
        return f"PASS: {len(ran)} runtime run(s) within tolerance"
    if not failed:
        return "FAIL: no runtime could run"
    return "FAIL: " + "; ".join(f"{_label(r)} {_verdict(r)}" for r in failed)


def _convention_text(name: str, found: dict[str, Any]) -> str:
    value = found.get("value")
    text = f"{name} {'dynamic' if value is None else value} ({found.get('how', '?')}"
    if found.get("how") == "tried" and found.get("note"):
        text += f": {found['note']}"
    candidates = found.get("candidates") or []
    if candidates:
        text += "; tried " + ", ".join(
            f"{c.get('value')} {_fmt(c.get('scale_aware_error'))}" for c in candidates)
    return text + ")"


def artifact_lines(result: Verdict) -> list[str]:
    """What an artifact row says beyond its verdict: where the file came from and what it was run in, the
    conventions found (and every candidate tried), where it first diverges, and for a reduced-precision failure
    the float16 headroom of the stages past float16's range."""
    entry = result.artifact
    if not entry:
        return []
    lines = [f"{entry.get('format')} file {entry.get('path')}, run in {entry.get('runtime')}; precision "
             f"{entry.get('precision')} ({entry.get('precision_how', 'found')})"]
    conventions = entry.get("conventions") or {}
    if conventions:
        lines.append("conventions: " + "; ".join(_convention_text(k, v) for k, v in conventions.items()
                                                 if isinstance(v, dict)))
    where = entry.get("first_divergence")
    if where:
        parts = [f"first diverges at {where.get('feature')}"]
        if where.get("block") is not None:
            parts.append(f"block {where['block']}")
        if where.get("op"):
            parts.append(f"op {where['op']}")
        if where.get("tensor"):
            parts.append(f"tensor {where['tensor']}")
        if where.get("scale_aware_error") is not None:
            parts.append(f"error {_fmt(where['scale_aware_error'])} vs tolerance {_fmt(where.get('tolerance'))}")
        if where.get("how"):
            parts.append(str(where["how"]))
        if where.get("non_finite_op"):
            parts.append(f"first non-finite or saturated output: {where['non_finite_op']}")
        lines.append(", ".join(parts))
    localisation = entry.get("localisation") or {}
    if localisation.get("how"):
        lines.append(f"stages: {localisation['how']}")
    metrics = entry.get("metrics")
    if metrics:
        sqnr = metrics.get("sqnr_db") or {}
        lines.append("quantization: SQNR " + ", ".join(f"{k} {v:.1f} dB" for k, v in sqnr.items() if v is not None)
                     + (f"; top-1 {metrics['top1_agreement']:.0%}" if metrics.get("top1_agreement") is not None else "")
                     + (f", top-5 {metrics['top5_agreement']:.0%}" if metrics.get("top5_agreement") is not None else ""))
    headroom = entry.get("headroom") or {}
    past = [f"{stage} {what} {value:.3g}" for stage, figures in headroom.items() if isinstance(figures, dict)
            for what, value in figures.items()
            if what != "float16_max" and isinstance(value, (int, float)) and value >= figures.get("float16_max", 65504)]
    if past:
        lines.append("float16 headroom exceeded (keep these in float32): " + "; ".join(past))
    return lines


# ------------------------------------------------------------------ terminal

def terminal_table(report: ParityReport) -> str:
    ck = report.checkpoint
    inputs = report.inputs
    lines = [
        f"checkpoint  {ck.get('path') or ck.get('file_name')}  ({ck['format']}, {ck['variant']}, "
        f"{ck['num_classes'] or 'no'} classes)",
        f"sha256      {ck.get('sha256') or '-'}",
        *([f"source      {src['format']} {src['file_name'] or '-'} sha256 {src['sha256'] or '-'}"]
          if (src := ck.get("source")) else []),
        f"inputs      {inputs['batch']} x {inputs['image_size']}px "
        + (f"random, seed {inputs['seed']}" if inputs["kind"] == "random" else f"{inputs['kind']}"),
        "referee     torch float64; tolerance: " + "; ".join(
            f"{d}: {t['description']}" for d, t in report.tolerance.items()),
        "",
    ]
    features = report.baseline["scale_aware_error"].keys()
    header = f"{'runtime':<28} {'verdict':<32} " + " ".join(f"{f:>9}" for f in features) + f" {'top-1':>6} {'s':>6}"
    lines += [header, "-" * len(header)]
    lines.append(f"{'(torch float32 baseline)':<28} {'':<32} "
                 + " ".join(f"{report.baseline['scale_aware_error'][f]:>9.1e}" for f in features))
    for dtype, reduced in report.baseline.get("reduced", {}).items():
        lines.append(f"{f'(torch {dtype} baseline)':<28} {'norms in float32':<32} "
                     + " ".join(f"{reduced['scale_aware_error'][f]:>9.1e}" for f in features))
    for r in report.runtimes:
        cells = []
        for name in features:
            fr = r.feature(name)
            if fr is None or fr.scale_aware_error is None:
                cells.append(f"{'-':>9}" if fr is None or fr.status != "fail" else f"{'FAIL':>9}")
            else:
                mark = "!" if fr.status == "fail" else " "
                cells.append(f"{fr.scale_aware_error:>8.1e}{mark}")
        logits = r.feature("logits")
        top1 = "-" if logits is None or logits.top1_agreement is None else f"{logits.top1_agreement:.0%}"
        lines.append(f"{_label(r):<28} {_verdict(r):<32} " + " ".join(cells) + f" {top1:>6} {r.seconds:>6.1f}")
        if r.reason:
            lines.append(f"{'':<28} {r.reason}")
        lines += [f"{'':<28} {line}" for line in artifact_lines(r)]
    lines += ["", "cells: scale-aware error max|runtime - referee| / max|referee|; '!' = above tolerance", "",
              _summary_line(report)]
    return "\n".join(lines)


# ------------------------------------------------------------------ markdown

def to_markdown(report: ParityReport) -> str:
    ck = report.checkpoint
    features = list(report.baseline["scale_aware_error"])
    out = [
        f"## ConvNeXt V2 parity: {'✅ pass' if report.passed else '❌ fail'}",
        "",
        f"Checkpoint `{ck.get('path') or ck.get('file_name')}` ({ck['format']}, {ck['variant']}, sha256 "
        f"`{ck.get('sha256') or '-'}`"
        + (f"; converted from {ck['source']['format']} `{ck['source']['file_name'] or '-'}`, sha256 "
           f"`{ck['source']['sha256'] or '-'}`" if ck.get("source") else "") + "); "
        f"{report.inputs['batch']} images at {report.inputs['image_size']} px ({report.inputs['kind']}); "
        "referee: PyTorch float64.",
        "",
        "Scale-aware error (max |runtime − referee| / max |referee|) per feature; **bold** = above tolerance.",
        "",
        "| runtime | verdict | " + " | ".join(features) + " | top-1 | top-5 |",
        "|---|---|" + "---:|" * len(features) + "---:|---:|",
        "| *torch float32 baseline* | | " + " | ".join(
            _fmt(report.baseline["scale_aware_error"][f]) for f in features) + " | | |",
    ]
    for r in report.runtimes:
        cells = []
        for name in features:
            fr = r.feature(name)
            text = "–" if fr is None or fr.scale_aware_error is None else _fmt(fr.scale_aware_error)
            cells.append(f"**{text}**" if fr is not None and fr.status == "fail" else text)
        logits = r.feature("logits")
        top1 = "" if logits is None or logits.top1_agreement is None else f"{logits.top1_agreement:.0%}"
        top5 = "" if logits is None or logits.top5_overlap is None else f"{logits.top5_overlap:.0%}"
        out.append(f"| {_label(r)} | {_verdict(r)} | " + " | ".join(cells) + f" | {top1} | {top5} |")
    notes = [f"- {_label(r)}: " + "; ".join(filter(None, [r.reason, *artifact_lines(r)]))
             for r in report.runtimes if r.reason or r.artifact]
    if notes:
        out += ["", *notes]
    out += ["", "Tolerance: " + "; ".join(f"{d}: {t['description']}" for d, t in report.tolerance.items()), ""]
    return "\n".join(out)


# ------------------------------------------------------------------ JUnit

def to_junit(report: ParityReport) -> bytes:
    suites = ET.Element("testsuites", name="convnextv2-parity")
    total = failures = errors = skipped = 0
    for r in report.runtimes:
        suite = ET.SubElement(suites, "testsuite", name=f"parity.{_label(r)}", time=f"{r.seconds:.3f}")
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if r.artifact:
            ET.SubElement(suite, "system-out").text = "\n".join(artifact_lines(r))
        if r.status in ("unavailable", "error"):
            case = ET.SubElement(suite, "testcase", classname=f"parity.{_label(r)}", name="run")
            counts["tests"] += 1
            if r.status == "unavailable" and r.artifact is not None:
                # An artifact that cannot run here was not checked: a failure, not a skip.
                ET.SubElement(case, "failure", message=r.reason, type="NotChecked").text = r.reason
                counts["failures"] += 1
            elif r.status == "unavailable":
                ET.SubElement(case, "skipped", message=r.reason)
                counts["skipped"] += 1
            else:
                ET.SubElement(case, "error", message=r.reason, type="RuntimeError").text = r.reason
                counts["errors"] += 1
        for fr in r.features:
            case = ET.SubElement(suite, "testcase", classname=f"parity.{_label(r)}", name=fr.name)
            counts["tests"] += 1
            if fr.status == "fail":
                detail = (f"{fr.message}; scale-aware error {_fmt(fr.scale_aware_error)}, tolerance "
                          f"{_fmt(fr.tolerance_scale_aware)}")
                ET.SubElement(case, "failure", message=fr.message, type="ParityFailure").text = detail
                counts["failures"] += 1
            elif fr.status == "not-exposed":
                ET.SubElement(case, "skipped", message=fr.message)
                counts["skipped"] += 1
            else:
                ET.SubElement(case, "system-out").text = (
                    f"max abs {_fmt(fr.max_abs_error)}, scale-aware {_fmt(fr.scale_aware_error)}, "
                    f"tolerance {_fmt(fr.tolerance_scale_aware)}, cosine {fr.cosine_similarity}")
        for key, value in counts.items():
            suite.set(key, str(value))
        total += counts["tests"]
        failures += counts["failures"]
        errors += counts["errors"]
        skipped += counts["skipped"]
    suites.set("tests", str(total))
    suites.set("failures", str(failures))
    suites.set("errors", str(errors))
    suites.set("skipped", str(skipped))
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


# ------------------------------------------------------------------ the chart (SVG and PNG share the geometry)

def _chart_series(report: ParityReport) -> tuple[list[str], list[tuple[str, list[float | None], bool]]]:
    features = [f for f in FEATURES if f in report.baseline["scale_aware_error"]]
    series: list[tuple[str, list[float | None], bool]] = [
        ("torch float32 baseline", [report.baseline["scale_aware_error"][f] for f in features], True)]
    with_features = [r for r in report.runtimes if r.dtype == "float32" and r.features]
    if with_features:
        tolerance = []
        for name in features:
            values = [fr.tolerance_scale_aware for r in with_features if (fr := r.feature(name)) is not None
                      and fr.tolerance_scale_aware is not None]
            tolerance.append(min(values) if values else None)
        series.append(("float32 tolerance", tolerance, True))
    for r in report.runtimes:
        if r.status == "unavailable" or not r.features:
            continue
        values = []
        for name in features:
            fr = r.feature(name)
            values.append(None if fr is None else fr.scale_aware_error)
        series.append((_label(r), values, False))
    return features, series


def _log_range(series: list[tuple[str, list[float | None], bool]]) -> tuple[float, float]:
    values = [v for _, vs, _ in series for v in vs if v is not None and v > 0]
    low = math.floor(math.log10(min(values))) if values else -8
    high = math.ceil(math.log10(max(values))) if values else 0
    return float(min(low, -8)), float(max(high, low + 2, -4))


@dataclasses.dataclass(frozen=True)
class _Chart:
    """The per-stage error chart's data and geometry, shared by the SVG and PNG renderers."""

    features: list[str]
    series: list[tuple[str, list[float | None], bool]]
    low: float
    high: float
    width: int
    height: int
    left: int = 70
    right: int = 190
    top: int = 20
    bottom: int = 40

    @classmethod
    def of(cls, report: ParityReport, width: int, height: int) -> _Chart:
        features, series = _chart_series(report)
        low, high = _log_range(series)
        return cls(features, series, low, high, width, height)

    @property
    def plot_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> int:
        return self.height - self.top - self.bottom

    def x(self, i: int) -> float:
        return self.left + (self.plot_w * i / max(len(self.features) - 1, 1))

    def y(self, value: float) -> float:
        v = math.log10(max(value, 10 ** self.low))
        return self.top + self.plot_h * (self.high - v) / (self.high - self.low)


def to_svg(report: ParityReport, width: int = 760, height: int = 360) -> str:
    chart = _Chart.of(report, width, height)
    features, series, low, high, x, y = chart.features, chart.series, chart.low, chart.high, chart.x, chart.y
    left, right, top, bottom = chart.left, chart.right, chart.top, chart.bottom
    plot_w, plot_h = chart.plot_w, chart.plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11" role="img" aria-label="per-stage scale-aware error">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for exponent in range(int(low), int(high) + 1):
        yy = y(10.0 ** exponent)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">1e{exponent}</text>')
    for i, name in enumerate(features):
        parts.append(f'<text x="{x(i):.1f}" y="{height - bottom + 16}" text-anchor="middle">{name}</text>')
    for index, (label, values, dashed) in enumerate(series):
        colour = ("#000" if index == 0 else "#888") if dashed else _PALETTE[index % len(_PALETTE)]
        points = [(x(i), y(v)) for i, v in enumerate(values) if v is not None]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            dash = ' stroke-dasharray="5,4"' if dashed else ""
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for px, py in points:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>')
        ly = top + 14 * index + 8
        parts.append(f'<line x1="{width - right + 10}" x2="{width - right + 30}" y1="{ly}" y2="{ly}" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{width - right + 36}" y="{ly + 4}">{html.escape(label)}</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2:.0f}" transform="rotate(-90 14 {top + plot_h / 2:.0f})" '
                 'text-anchor="middle">scale-aware error</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def to_html(report: ParityReport) -> str:
    rows = []
    features = list(report.baseline["scale_aware_error"])
    for r in report.runtimes:
        cells = []
        for name in features:
            fr = r.feature(name)
            text = "–" if fr is None or fr.scale_aware_error is None else _fmt(fr.scale_aware_error)
            style = ' class="fail"' if fr is not None and fr.status == "fail" else ""
            cells.append(f"<td{style}>{text}</td>")
        note = "<br>".join(html.escape(line) for line in filter(None, [r.reason, *artifact_lines(r)]))
        rows.append(f"<tr><td>{html.escape(_label(r))}</td><td>{html.escape(_verdict(r))}</td>{''.join(cells)}"
                    f"<td>{note}</td></tr>")
    head = "".join(f"<th>{f}</th>" for f in features)
    base = "".join(f"<td>{_fmt(report.baseline['scale_aware_error'][f])}</td>" for f in features)
    ck = report.checkpoint
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ConvNeXt V2 parity</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child,td:nth-child(2),td:last-child{{text-align:left}}table{{border-collapse:collapse}}
.fail{{background:#fdd;font-weight:bold}}</style></head><body>
<h1>ConvNeXt V2 parity: {"pass" if report.passed else "FAIL"}</h1>
<p>{html.escape(str(ck.get('path') or ck.get('file_name')))} ({html.escape(ck['format'])}, {ck['variant']}, sha256
{html.escape(str(ck.get('sha256') or '-'))}); converted from {html.escape(str((ck.get('source') or {}).get('format', '-')))}
{html.escape(str((ck.get('source') or {}).get('file_name') or '-'))}, sha256
{html.escape(str((ck.get('source') or {}).get('sha256') or '-'))};
{report.inputs['batch']} images at {report.inputs['image_size']} px ({report.inputs['kind']}); referee PyTorch float64.</p>
{to_svg(report)}
<table><tr><th>runtime</th><th>verdict</th>{head}<th>note</th></tr>
<tr><td><i>torch float32 baseline</i></td><td></td>{base}<td></td></tr>
{''.join(rows)}</table>
<p>Cells: scale-aware error max|runtime − referee| / max|referee|. Tolerance:
{html.escape('; '.join(f"{d}: {t['description']}" for d, t in report.tolerance.items()))}.</p>
</body></html>
"""


def to_png(report: ParityReport, path: Path, width: int = 760, height: int = 360) -> None:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise BadInputError("a .png report needs Pillow (pip install 'convnextv2-toolkit[images]'); "
                            "a .html report has the same chart without it") from None
    chart = _Chart.of(report, width, height)
    features, series, low, high, x, y = chart.features, chart.series, chart.low, chart.high, chart.x, chart.y
    left, right, top, bottom = chart.left, chart.right, chart.top, chart.bottom
    plot_w, plot_h = chart.plot_w, chart.plot_h

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="#999999")
    for exponent in range(int(low), int(high) + 1):
        yy = y(10.0 ** exponent)
        draw.line([left, yy, left + plot_w, yy], fill="#eeeeee")
        draw.text((4, yy - 6), f"1e{exponent}", fill="black")
    for i, name in enumerate(features):
        draw.text((x(i) - 3 * len(name), height - bottom + 8), name, fill="black")
    for index, (label, values, dashed) in enumerate(series):
        colour = ("#000000" if index == 0 else "#888888") if dashed else _PALETTE[index % len(_PALETTE)]
        points = [(x(i), y(v)) for i, v in enumerate(values) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=1 if dashed else 2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 14 * index + 8
        draw.line([width - right + 10, ly, width - right + 30, ly], fill=colour, width=2)
        draw.text((width - right + 36, ly - 6), label[:24], fill="black")
    image.save(path, format="PNG")


# ------------------------------------------------------------------ files

def check_report_paths(paths: list[Path], overwrite: bool = True) -> None:
    """Refuse unknown extensions and missing directories before any model runs."""
    for path in paths:
        if path.suffix.lower() not in REPORT_SUFFIXES:
            raise BadInputError(f"--report {path}: unknown extension; use one of {', '.join(REPORT_SUFFIXES)}")
        if not path.parent.exists():
            raise BadInputError(f"--report {path}: directory {path.parent} does not exist")
        if path.suffix.lower() == ".png":
            import importlib.util

            if importlib.util.find_spec("PIL") is None:
                raise BadInputError(f"--report {path}: .png reports need Pillow; use .html for the same chart")


def write_report(report: ParityReport, path: Path, overwrite: bool = True) -> None:
    suffix = path.suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise BadInputError(f"{path}: unknown report extension; use one of {', '.join(REPORT_SUFFIXES)}")
    with atomic_file(path, overwrite=overwrite) as tmp:
        if suffix == ".json":
            tmp.write_text(json.dumps(report.to_json_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n",
                           encoding="utf-8")
        elif suffix == ".md":
            tmp.write_text(to_markdown(report), encoding="utf-8")
        elif suffix == ".xml":
            tmp.write_bytes(to_junit(report))
        elif suffix == ".html":
            tmp.write_text(to_html(report), encoding="utf-8")
        else:
            to_png(report, tmp)
