"""Huge original checkpoint -> canonical / HF: wall time and peak RSS from outside, against ``cp`` of the same
file, ``cp`` followed by an fsync (our writes are durable: atomic_file fsyncs before the rename), the source's
sha256 alone (hashlib, the digest every conversion records by default; one read of the source), our conversion
with ``--no-source-digest`` (the data path alone), and the naive route in a subprocess (torch.load(weights_only=True,
mmap=False), rename, safetensors.torch.save_file).

Every contender starts from the same state: the source read into the page cache (or evicted), no dirty data left
by the one before (``sync``), and a pause for the filesystem to settle (this machine's ext4 is mounted with online
``discard``: a deleted multi-GB output is trimmed in the background and slows whatever writes next).

The read-back figure (issue 23): ``ours -> canonical`` (which reads every output back bit for bit) against the
floor measured in the same run, the larger of a durable copy (``cp + fsync``) and the source's sha256 alone;
goal <= 1.5x the floor, peak anonymous memory <= 0.15x the file. Alone::

    python -m benchmarks.conversion --variant huge [--source huge.pt] [--runs 5] [--contenders floor]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import evict_file, run_measured, warm_file

# Issue 23's bars for the read-back figure.
FLOOR_RATIO_GOAL = 1.5
ANON_VS_FILE_GOAL = 0.15
DURABLE_COPY = "cp + fsync"
SHA256_ALONE = "sha256 of the source alone (hashlib)"
CANONICAL = "ours -> canonical"
# --contenders floor: what the read-back figure needs, nothing else.
FLOOR_CONTENDERS = (DURABLE_COPY, SHA256_ALONE, CANONICAL)

NAIVE_ROUTE = r"""
import argparse
import sys
import torch
from safetensors.torch import save_file
from convnextv2.converters.original import DENSE

src, dst = sys.argv[1:3]
# The released checkpoints carry argparse.Namespace training args: the documented allow-listing.
with torch.serialization.safe_globals([argparse.Namespace]):
    state = torch.load(src, map_location="cpu", weights_only=True, mmap=False)["model"]
tensors = {}
for key, value in state.items():
    name, rule = DENSE.to_canonical(key)
    tensors[name] = value.reshape(-1).contiguous() if rule.transform.name == "grn" else value.contiguous()
save_file(tensors, dst, metadata={"format": "pt"})
"""


def make_source(cache: Path, variant: str, log: Any) -> Path:
    """The original-layout fixture, made once (deterministic, seed 0) and kept in the cache folder."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{variant}-original.pt"
    if not path.exists():
        log(f"making the {variant} original checkpoint in {path} (once)")
        subprocess.run([sys.executable, "-m", "convnextv2.converters", "fixture", "--variant", variant, "-o", str(path),
                        "--seed", "0"], check=True, env={**os.environ, "CONVNEXTV2_PROGRESS": "0"})
    return path


HASH_ONLY = r"""
import hashlib
import sys
digest = hashlib.sha256()
with open(sys.argv[1], "rb", buffering=0) as handle:
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    while count := handle.readinto(buffer):
        digest.update(view[:count])
print(digest.hexdigest())
"""


def _contenders(src: Path, work: Path, hf_available: bool) -> dict[str, tuple[list[str], Path | None]]:
    python = sys.executable
    convert = [python, "-m", "convnextv2.converters", "convert", str(src)]
    rows: dict[str, tuple[list[str], Path | None]] = {
        "cp": (["cp", str(src), str(work / "cp.pt")], work / "cp.pt"),
        DURABLE_COPY: (["sh", "-c", f'cp "{src}" "{work}/cps.pt" && sync "{work}/cps.pt"'], work / "cps.pt"),
        SHA256_ALONE: ([python, "-c", HASH_ONLY, str(src)], None),
        # --json: the summary names the read-back's own seconds.
        CANONICAL: (convert + ["-o", str(work / "out.safetensors"), "--to", "canonical", "--json"],
                    work / "out.safetensors"),
        "ours -> canonical, --no-source-digest": (
            convert + ["-o", str(work / "out-nd.safetensors"), "--to", "canonical", "--no-source-digest"],
            work / "out-nd.safetensors"),
    }
    if hf_available:
        rows["ours -> hf"] = (convert + ["-o", str(work / "out-hf"), "--to", "hf"], work / "out-hf")
        rows["ours -> hf, --no-source-digest"] = (
            convert + ["-o", str(work / "out-hf-nd"), "--to", "hf", "--no-source-digest"], work / "out-hf-nd")
    rows["naive (torch.load + save_file)"] = ([python, "-c", NAIVE_ROUTE, str(src), str(work / "naive.safetensors")],
                                              work / "naive.safetensors")
    return rows


def _remove(path: Path | None) -> None:
    if path is None or not path.exists():
        return
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _settle(seconds: float) -> None:
    """No dirty pages from the previous contender, and time for background trims of its deleted output."""
    os.sync()
    time.sleep(seconds)


def run(cache: Path, variant: str, runs: int, cache_mode: str, log: Any, settle: float = 2.0,
        source: Path | None = None, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every contender ``runs`` times (``only``: those named); ``source``: an original checkpoint of ``variant``
    made earlier, instead of the one made once in ``cache``."""
    from convnextv2 import converters

    src = source if source is not None else make_source(cache, variant, log)
    size = src.stat().st_size
    work = cache / "conversion-work"
    work.mkdir(parents=True, exist_ok=True)
    hf_available = "hf" in converters.available_formats()
    contenders = _contenders(src, work, hf_available)
    if only is not None:
        contenders = {name: contenders[name] for name in only}
    env = {**os.environ, "CONVNEXTV2_PROGRESS": "0"}
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    names = list(contenders)
    for index in range(runs):
        # Rotate the order each run so no contender always follows the same one.
        order = names[index % len(names):] + names[: index % len(names)]
        for name in order:
            command, output = contenders[name]
            _remove(output)
            _settle(settle)
            if cache_mode == "cold":
                evict_file(src)
            else:
                warm_file(src)
            result = run_measured(command, env=env)
            if result["returncode"] != 0:
                raise RuntimeError(f"{name} failed ({result['returncode']}): {result['output_tail']}")
            _remove(output)
            samples[name].append(result)
            log(f"  {name}: {result['wall_s']:.2f} s, peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB")
    rows = []
    cp_wall = statistics.median(s["wall_s"] for s in samples["cp"]) if "cp" in samples else None
    durable_cp_wall = statistics.median(s["wall_s"] for s in samples[DURABLE_COPY])
    for name in names:
        walls = [s["wall_s"] for s in samples[name]]
        rss = [s["peak_rss_bytes"] for s in samples[name]]
        anon = [s["peak_anon_bytes"] for s in samples[name] if s.get("peak_anon_bytes") is not None]
        wall = statistics.median(walls)
        rows.append({
            "contender": name, "wall_s": round(wall, 2), "wall_all_s": [round(w, 2) for w in walls],
            "wall_vs_cp": round(wall / cp_wall, 2) if cp_wall else None,
            "wall_vs_cp_fsync": round(wall / durable_cp_wall, 2),
            "peak_rss_mib": round(max(rss) / 2**20, 1),
            "peak_rss_vs_file": round(max(rss) / size, 3),
            "peak_anon_mib": round(max(anon) / 2**20, 1) if anon else None,
            "cpu_s": round(statistics.median(s["user_s"] + s["sys_s"] for s in samples[name]), 2),
        })
    if not hf_available and only is None:
        rows.append({"contender": "ours -> hf", "not_available": "converters.hf is not importable"})
    return {"variant": variant, "file": str(src), "file_bytes": size, "runs": runs, "page_cache": cache_mode,
            "settle_s": settle, "rows": rows, "read_back_figure": read_back_figure(samples, size)}


def read_back_figure(samples: dict[str, list[dict[str, Any]]], size: int) -> dict[str, Any]:
    """Ours -> canonical (read-back included) against the floor of the same run: medians of each contender's
    wall time; the peak anonymous memory is the largest of our runs."""
    durable = statistics.median(s["wall_s"] for s in samples[DURABLE_COPY])
    digest = statistics.median(s["wall_s"] for s in samples[SHA256_ALONE])
    ours = samples[CANONICAL]
    wall = statistics.median(s["wall_s"] for s in ours)
    floor = max(durable, digest)
    anon = [s["peak_anon_bytes"] for s in ours if s.get("peak_anon_bytes") is not None]
    read_backs = [seconds for s in ours if (seconds := _read_back_seconds(s["output_tail"])) is not None]
    return {
        "contender": CANONICAL, "wall_s": round(wall, 2), "durable_copy_s": round(durable, 2),
        "sha256_s": round(digest, 2), "floor_s": round(floor, 2),
        "floor_is": DURABLE_COPY if durable >= digest else SHA256_ALONE,
        "vs_floor": round(wall / floor, 2), "vs_floor_goal": FLOOR_RATIO_GOAL,
        "read_back_s": round(statistics.median(read_backs), 2) if read_backs else None,
        "peak_anon_mib": round(max(anon) / 2**20, 1) if anon else None,
        "anon_vs_file": round(max(anon) / size, 4) if anon else None, "anon_vs_file_goal": ANON_VS_FILE_GOAL,
    }


def _read_back_seconds(output: str) -> float | None:
    """The read-back's seconds from ``convert --json``'s summary (the last JSON object printed)."""
    start = output.rfind("\n{")
    try:
        summary = json.loads(output[start + 1 if start >= 0 else output.find("{"):])
        return float(summary["read_back"]["seconds"])
    except (ValueError, KeyError, TypeError):
        return None


def figure_table(conversion: dict[str, Any]) -> list[str]:
    """The read-back figure as a markdown table (bench.md, and ``python -m benchmarks.conversion``)."""
    f = conversion.get("read_back_figure")
    if not f:
        return []
    anon = "not measured" if f["anon_vs_file"] is None else f"{f['peak_anon_mib']:,.0f} MiB = {f['anon_vs_file']:.3f}"
    read_back = "" if f["read_back_s"] is None else f"{f['read_back_s']:.2f}"

    def verdict(ok: bool | None) -> str:
        return "" if ok is None else ("met" if ok else "**not met**")

    header = ("| contender | wall s | durable copy s | sha256 alone s | floor s | vs floor (goal ≤ "
              f"{f['vs_floor_goal']}) | read-back s | peak anonymous / file (goal ≤ {f['anon_vs_file_goal']}) |")
    row = (f"| {f['contender']}, read-back included | {f['wall_s']:.2f} | {f['durable_copy_s']:.2f} | "
           f"{f['sha256_s']:.2f} | {f['floor_s']:.2f} | {f['vs_floor']:.2f}× "
           f"{verdict(f['vs_floor'] <= f['vs_floor_goal'])} | "
           f"{read_back} | "
           f"{anon} {verdict(None if f['anon_vs_file'] is None else f['anon_vs_file'] <= f['anon_vs_file_goal'])} |")
    return [f"### Read-back at the floor: {conversion['variant']} original -> canonical "
            f"({conversion['file_bytes'] / 1e9:.2f} GB), median of {conversion['runs']} runs", "",
            header, "|---|---|---|---|---|---|---|---|", row, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conversion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="huge")
    parser.add_argument("--source", type=Path, default=None,
                        help="an original checkpoint of --variant made earlier (default: made once in --out/cache)")
    parser.add_argument("--runs", type=int, default=5, help="runs per contender (median reported)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after a sync before each contender")
    parser.add_argument("--page-cache", choices=["warm", "cold"], default="warm")
    parser.add_argument("--contenders", choices=["all", "floor"], default="all",
                        help="floor: only what the read-back figure needs (durable copy, sha256, ours -> canonical)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="writes conversion.json there")
    args = parser.parse_args(argv)
    os.environ["CONVNEXTV2_PROGRESS"] = "0"

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    load = os.getloadavg()
    result = run(cache, args.variant, args.runs, args.page_cache, log, settle=args.settle, source=args.source,
                 only=FLOOR_CONTENDERS if args.contenders == "floor" else None)
    result["load_average"] = {"start": list(load), "end": list(os.getloadavg())}
    shutil.rmtree(cache / "conversion-work", ignore_errors=True)
    (args.out / "conversion.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(figure_table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
