"""The demo job: a bundled default checkpoint converted and checked end to end, in seconds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def seeded_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Standard-normal NCHW float32 images: the same for every runtime, every machine."""
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


def run_demo(out_dir: Path, echo: Callable[[str], None]) -> bool:
    import torch

    from convnextv2 import converters, reference
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
    images = torch.from_numpy(seeded_images(4, 224))
    loaded = converters.load(canonical)
    with torch.no_grad():
        fp32 = reference.build(loaded, "torch")(images).double()
        fp64 = reference.build(loaded, "torch", dtype="float64")(images.double())
    err = float((fp32 - fp64).abs().max())
    scale = float(fp64.abs().max())
    top1 = bool((fp32.argmax(1) == fp64.argmax(1)).all())
    # 1e-5 scale-aware error is ~20x the fp32 floor measured for atto (facts §5): a real bug is far above it.
    ok_numbers = err / scale < 1e-5 and top1
    echo(f"4. PyTorch float32 vs float64 referee: max |dlogit| {err:.2e} (scale-aware {err / scale:.2e}), "
         f"top-1 {'identical' if top1 else 'DIFFERENT'}")
    ok = exact and ok_numbers
    echo("PASS" if ok else "FAIL")
    return ok
