"""python -m benchmarks [--sections conversion,inference,export] [--variants atto,tiny,base] ...

Writes bench-results/bench.json (everything measured) and bench-results/bench.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report

SECTIONS = ("conversion", "inference", "export")
ALL_RUNTIMES = ("torch", "torch-plain", "tensorflow", "flax", "onnxruntime", "timm", "transformers", "onnxruntime-timm")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma list of %(default)s")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--convert-variant", default="huge", help="checkpoint size for the conversion section")
    parser.add_argument("--convert-runs", type=int, default=5, help="runs per contender (median reported)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to wait after a sync before each conversion contender")
    parser.add_argument("--page-cache", choices=["warm", "cold"], default="warm",
                        help="warm: the source is read once before every run; cold: evicted before every run")
    parser.add_argument("--keep-source", action="store_true", help="keep the (2.6 GB) source checkpoint afterwards")
    parser.add_argument("--variants", default="atto,tiny,base")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per batch size")
    parser.add_argument("--iters", type=int, default=3, help="timed forwards per runtime per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtimes", default=",".join(ALL_RUNTIMES))
    parser.add_argument("--export-variants", default="atto")
    args = parser.parse_args(argv)
    os.environ["CONVNEXTV2_PROGRESS"] = "0"
    sections = _csv(args.sections)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": list(os.getloadavg())},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if "conversion" in sections:
        from benchmarks import conversion

        log(f"conversion: {args.convert_variant} original -> canonical / hf")
        results["conversion"] = conversion.run(cache, args.convert_variant, args.convert_runs, args.page_cache, log,
                                               settle=args.settle)
        if not args.keep_source:
            Path(results["conversion"]["file"]).unlink(missing_ok=True)
        shutil.rmtree(cache / "conversion-work", ignore_errors=True)
    if "export" in sections:
        from benchmarks import export

        log("export: ONNX export time per path")
        results["export"] = export.run(_csv(args.export_variants), cache / "export", log)
    if "inference" in sections:
        from benchmarks import inference

        results["inference"] = inference.run(
            _csv(args.variants), [int(b) for b in _csv(args.batches)], args.size, args.rounds, args.iters,
            args.threads, _csv(args.runtimes), cache / "inference", log)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "bench.md").write_text(report.markdown(results))
    log(f"wrote {args.out / 'bench.md'} and {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
