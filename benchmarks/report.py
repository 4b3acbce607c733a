"""bench.json -> bench.md."""

from __future__ import annotations

from typing import Any

from benchmarks.conversion import figure_table


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return lines


def _mib(value: float) -> str:
    return f"{value:,.0f}"


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    out = [
        "# convnextv2 toolkit benchmarks", "",
        f"Run {results['started']} → {results.get('finished', '?')}; {machine['cpus']} CPUs, {machine['platform']}, "
        f"Python {machine['python']}; load average at start {', '.join(f'{x:.1f}' for x in machine['load_average_at_start'])}"
        f", at end {', '.join(f'{x:.1f}' for x in machine.get('load_average_at_end', []))}.", "",
    ]
    conversion = results.get("conversion")
    if conversion:
        size = conversion["file_bytes"]
        out += [f"## Conversion: {conversion['variant']} original checkpoint ({size / 1e9:.2f} GB)", "",
                f"Median of {conversion['runs']} runs per contender, order rotated each run; page cache "
                f"{conversion['page_cache']} before every run (both `cp` and ours read the same file). Wall time and "
                "peak RSS measured from outside (wait4 rusage of the child; mapped file pages count in RSS).", ""]
        rows = []
        for r in conversion["rows"]:
            if "not_available" in r:
                rows.append([r["contender"], "not available", "", "", "", "", r["not_available"]])
                continue
            rows.append([r["contender"], f"{r['wall_s']:.2f}", f"{r['wall_vs_cp']:.2f}×",
                         f"{r['wall_vs_cp_fsync']:.2f}×", _mib(r["peak_rss_mib"]), f"{r['peak_rss_vs_file']:.3f}",
                         f"{r['cpu_s']:.2f}", " / ".join(map(str, r["wall_all_s"]))])
        out += _table(["contender", "wall s (median)", "wall vs cp", "wall vs cp + fsync", "peak RSS MiB",
                       "RSS / file size", "CPU s", "all runs s"], rows) + [""]
        out += figure_table(conversion)
    export = results.get("export")
    if export:
        out += ["## ONNX export time per path", "",
                "Fresh process per export; ours include the built-in check (onnx.checker + onnxruntime vs the float64 "
                "referee at 224) that gates writing the file.", ""]
        rows = []
        for r in export["rows"]:
            if "not_available" in r:
                rows.append([r["variant"], r["path"], "not available", "", r["not_available"]])
            else:
                rows.append([r["variant"], r["path"], f"{r['export_and_check_s']:.1f}", f"{r['import_s']:.1f}",
                             "check passed" if r.get("ok") else "CHECK FAILED"])
        out += _table(["variant", "path", "export (+check) s", "imports s", "note"], rows) + [""]
    inference = results.get("inference")
    if inference:
        out += [f"## Inference at {inference['size']}×{inference['size']}, {inference['threads']} threads per runtime", "",
                f"Each framework in its own worker process; warm-up, then {inference['rounds']} interleaved rounds of "
                f"{inference['iters_per_round']} forwards per runtime (order rotated); median latency. GFLOP/s = "
                "2 × GMACs(224) × batch / latency. Speed-up > 1 means ours is faster: PyTorch/TF/Flax rows against the "
                "faster of timm and transformers, TF/Flax also against our PyTorch reference, our ONNX export against "
                "timm's legacy export in the same onnxruntime.", ""]
        rows = []
        for r in inference["rows"]:
            if "not_available" in r:
                rows.append([r["variant"], r["batch"], r["label"], "not available", "", "", r["not_available"][:120]])
                continue
            ratios = []
            if "speedup_vs_faster_torch_peer" in r:
                ratios.append(f"{r['speedup_vs_faster_torch_peer']:.2f}× vs faster peer")
            if "speedup_vs_torch_reference" in r:
                ratios.append(f"{r['speedup_vs_torch_reference']:.2f}× vs our PyTorch")
            if "speedup_vs_timm_onnx" in r:
                ratios.append(f"{r['speedup_vs_timm_onnx']:.2f}× vs timm ONNX")
            rows.append([r["variant"], r["batch"], r["label"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}",
                         f"{r['gflops']:.1f}", "; ".join(ratios) + (f" ({r['note']})" if r.get("note") else "")])
        out += _table(["variant", "batch", "runtime", "median ms", "min ms", "GFLOP/s", "speed-up"], rows) + [""]
    out += acceptance(results)
    return "\n".join(out) + "\n"


# The project's acceptance bars, checked against the figures of the tables above.
CONVERSION_RSS_BAR = 0.15
CONVERSION_WALL_BAR = 1.5
PEER_BAR = 1.0
OTHER_FRAMEWORK_BAR = 1 / 1.3  # "within 1.3x of the PyTorch reference, or faster", as a speed-up


def acceptance(results: dict[str, Any]) -> list[str]:
    """One line per bar and measured row: the figure, the bar, pass or FAIL. Nothing here is re-measured."""
    rows: list[list[Any]] = []

    def verdict(ok: bool) -> str:
        return "pass" if ok else "**FAIL**"

    for r in (results.get("conversion") or {}).get("rows", []):
        if "not_available" in r or not r["contender"].startswith("ours"):
            continue
        rows.append([r["contender"], "peak RSS / file size", f"≤ {CONVERSION_RSS_BAR}", f"{r['peak_rss_vs_file']:.3f}",
                     verdict(r["peak_rss_vs_file"] <= CONVERSION_RSS_BAR)])
        rows.append([r["contender"], "wall time vs cp", f"≤ {CONVERSION_WALL_BAR}×", f"{r['wall_vs_cp']:.2f}×",
                     verdict(r["wall_vs_cp"] <= CONVERSION_WALL_BAR)])
    figure = (results.get("conversion") or {}).get("read_back_figure")
    if figure:
        rows.append([f"{figure['contender']}, read-back included", "wall time vs the floor",
                     f"≤ {figure['vs_floor_goal']}×", f"{figure['vs_floor']:.2f}×",
                     verdict(figure["vs_floor"] <= figure["vs_floor_goal"])])
        if figure["anon_vs_file"] is not None:
            rows.append([f"{figure['contender']}, read-back included", "peak anonymous memory / file size",
                         f"≤ {figure['anon_vs_file_goal']}", f"{figure['anon_vs_file']:.3f}",
                         verdict(figure["anon_vs_file"] <= figure["anon_vs_file_goal"])])
    checks = (("speedup_vs_faster_torch_peer", "torch", "vs the faster of timm and transformers", PEER_BAR),
              ("speedup_vs_timm_onnx", "onnxruntime", "vs timm's export in onnxruntime", PEER_BAR),
              ("speedup_vs_torch_reference", None, "vs our PyTorch reference", OTHER_FRAMEWORK_BAR))
    for r in (results.get("inference") or {}).get("rows", []):
        for key, runtime, what, bar in checks:
            if key in r and (runtime is None or r["runtime"] == runtime):
                rows.append([f"{r['label']}, {r['variant']} b{r['batch']}", f"speed-up {what}", f"≥ {bar:.2f}×",
                             f"{r[key]:.2f}×", verdict(r[key] >= bar)])
    if not rows:
        return []
    failed = sum(1 for row in rows if row[-1] != "pass")
    return (["## Acceptance", "",
             f"{len(rows) - failed} of {len(rows)} bars met in this run" + (f"; {failed} not met." if failed else "."),
             ""] + _table(["what", "figure", "bar", "measured", "verdict"], rows) + [""])
