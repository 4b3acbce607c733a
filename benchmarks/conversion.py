"""Huge original checkpoint -> canonical / HF: wall time and peak RSS from outside, against ``cp`` of the same
file, ``cp`` followed by an fsync (our writes are durable: atomic_file fsyncs before the rename), the source's
sha256 alone (hashlib, the digest every conversion records by default; one read of the source), our conversion
with ``--no-source-digest`` (the data path alone), and the naive route in a subprocess (torch.load(weights_only=True,
mmap=False), rename, safetensors.torch.save_file).

Every contender starts from the same state: the source read into the page cache (or evicted), no dirty data left
by the one before (``sync``), and a pause for the filesystem to settle (this machine's ext4 is mounted with online
``discard``: a deleted multi-GB output is trimmed in the background and slows whatever writes next).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import evict_file, run_measured, warm_file

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
        "cp + fsync": (["sh", "-c", f'cp "{src}" "{work}/cps.pt" && sync "{work}/cps.pt"'], work / "cps.pt"),
        "sha256 of the source alone (hashlib)": ([python, "-c", HASH_ONLY, str(src)], None),
        "ours -> canonical": (convert + ["-o", str(work / "out.safetensors"), "--to", "canonical"],
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


def run(cache: Path, variant: str, runs: int, cache_mode: str, log: Any, settle: float = 2.0) -> dict[str, Any]:
    from convnextv2 import converters

    src = make_source(cache, variant, log)
    size = src.stat().st_size
    work = cache / "conversion-work"
    work.mkdir(exist_ok=True)
    hf_available = "hf" in converters.available_formats()
    contenders = _contenders(src, work, hf_available)
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
    cp_wall = statistics.median(s["wall_s"] for s in samples["cp"])
    durable_cp_wall = statistics.median(s["wall_s"] for s in samples["cp + fsync"])
    for name in names:
        walls = [s["wall_s"] for s in samples[name]]
        rss = [s["peak_rss_bytes"] for s in samples[name]]
        wall = statistics.median(walls)
        rows.append({
            "contender": name, "wall_s": round(wall, 2), "wall_all_s": [round(w, 2) for w in walls],
            "wall_vs_cp": round(wall / cp_wall, 2), "wall_vs_cp_fsync": round(wall / durable_cp_wall, 2),
            "peak_rss_mib": round(max(rss) / 2**20, 1),
            "peak_rss_vs_file": round(max(rss) / size, 3),
            "cpu_s": round(statistics.median(s["user_s"] + s["sys_s"] for s in samples[name]), 2),
        })
    if not hf_available:
        rows.append({"contender": "ours -> hf", "not_available": "converters.hf is not importable"})
    return {"variant": variant, "file": str(src), "file_bytes": size, "runs": runs, "page_cache": cache_mode,
            "settle_s": settle, "rows": rows}
