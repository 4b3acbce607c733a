"""``convnextv2 demo``: a bundled default checkpoint converted and checked end to end, in seconds."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

from convnextv2.reference import parity_rule as rule


def run_demo(out_dir: Path, echo: Callable[[str], None]) -> bool:
    from convnextv2 import converters
    from convnextv2.converters.torchzip import read_torch_zip
    from convnextv2.fixtures import write_fixture

    original = out_dir / "convnextv2_atto_1k_224_fixture.pt"
    canonical = out_dir / "convnextv2_atto.safetensors"
    back = out_dir / "convnextv2_atto_roundtrip.pt"
    write_fixture(original, "atto", "original", seed=0, overwrite=True)
    echo(f"1. made an original-layout atto checkpoint (seeded, no download): {original}")
    ckpt = converters.load(original)
    converters.save(ckpt, canonical, format="canonical", overwrite=True)
    echo(f"2. converted to canonical safetensors: {canonical}")
    converters.save(converters.load(canonical), back, format="original", overwrite=True)
    a, b = read_torch_zip(original)["model"], read_torch_zip(back)["model"]
    exact = a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)
    echo(f"3. canonical -> original round trip bit-exact over {len(a)} tensors: {'yes' if exact else 'NO'}")
    images = rule.seeded_images(rule.DEFAULT_BATCH, 224)
    loaded = converters.load(canonical)
    fp64 = rule.referee_features(loaded, images)["logits"]
    fp32 = rule.baseline_features(loaded, images)["logits"]
    err = rule.max_abs_error(fp32, fp64)
    scale = rule.feature_scale(fp64)
    top1 = bool((fp32.argmax(1) == fp64.argmax(1)).all())
    # The float32 build is the rule's yardstick, so it cannot be judged by the rule itself; an absolute bar
    # instead: 1e-5 scale-aware error is ~20x float32 rounding measured for atto, a real bug is far above it.
    ok_numbers = err / scale < 1e-5 and top1
    echo(f"4. PyTorch float32 vs float64 referee: max |dlogit| {err:.2e} (scale-aware {err / scale:.2e}), "
         f"top-1 {'identical' if top1 else 'DIFFERENT'}")
    ok = exact and ok_numbers
    echo("PASS" if ok else "FAIL")
    return ok


@click.command(short_help="Make, convert and check a bundled atto checkpoint end to end.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Keep the files here (default: a temporary directory).")
def demo(out_dir: Path | None) -> None:
    """The main job on a bundled default: original atto checkpoint -> canonical -> original, then parity.

    Makes the checkpoint locally (no download), converts it, proves the round trip is bit-exact and
    that the PyTorch reference's float32 logits match its float64 referee.
    """
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="convnextv2-demo-") as tmp:
            ok = run_demo(Path(tmp), click.echo)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        ok = run_demo(out_dir, click.echo)
    if not ok:
        sys.exit(1)
