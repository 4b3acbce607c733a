"""ExecuTorch: ``convert --to executorch`` writes a .pte that the plain ExecuTorch runtime runs without this
package, deterministically, checked before it is written; the channels-last trap of the old export path; the
``executorch`` parity runtime at every size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("executorch", reason="ExecuTorch is not installed: pip install 'convnextv2-toolkit[executorch]'")

from convnextv2 import converters  # noqa: E402
from convnextv2.converters import executorch  # noqa: E402
from convnextv2.fixtures import make_checkpoint, write_fixture  # noqa: E402
from convnextv2.parity_tests.conftest_helpers import run_cli  # noqa: E402
from convnextv2.parity_tests.harness import run_parity  # noqa: E402
from convnextv2.reference import parity_rule  # noqa: E402
from convnextv2.reference.errors import BadInputError, CheckFailedError  # noqa: E402

pytestmark = pytest.mark.executorch
# Small enough that a lowering costs seconds, with every structural feature (4 stages, >1 block, a head).
SMALL = "custom:depths=1,1,2,1;dims=8,16,32,64"
SIZES_224 = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")

_PLAIN_RUNNER = textwrap.dedent("""
    import importlib.abc, json, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "convnextv2":
                raise ImportError("this process must not import " + name)

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    import torch
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(sys.argv[1])
    out = program.load_method("forward").execute([torch.from_numpy(np.load(sys.argv[2]))])
    np.save(sys.argv[3], out[0].numpy())
    meta = json.loads(program.load_method("convnextv2_metadata").execute([])[0])
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "convnextv2")
    print(json.dumps({"methods": sorted(program.method_names), "outputs": len(out), "meta": meta, "leaked": leaked}))
""")


@pytest.fixture(scope="module")
def small_program(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    ckpt = make_checkpoint(SMALL, seed=4, num_classes=10)
    path = tmp_path_factory.mktemp("executorch") / "small.pte"
    converters.save(ckpt, path, "executorch", size=64)
    return ckpt, path


def test_convert_to_executorch_runs_in_the_plain_runtime(tmp_path):
    """atto through the command line; the .pte runs in a process that cannot import this package, on a batch
    the export never saw, and matches the float64 referee by the parity rule; the metadata travels inside."""
    src = tmp_path / "atto.pt"
    write_fixture(src, "atto", "original", seed=2)
    dst = tmp_path / "atto.pte"
    # The command line as a user runs it; the lowering alone is about a minute on two idle cores.
    done = subprocess.run([sys.executable, "-m", "convnextv2.converters", "convert", str(src), "--to", "executorch",
                           "-o", str(dst)], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "CONVNEXTV2_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    images = parity_rule.seeded_images(3, 224, seed=7)
    np.save(tmp_path / "x.npy", images)
    result = subprocess.run([sys.executable, "-I", "-c", _PLAIN_RUNNER, str(dst), str(tmp_path / "x.npy"),
                             str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["leaked"] == [] and report["outputs"] == 1
    assert report["methods"] == ["convnextv2_metadata", "forward"]
    ckpt = converters.load(src)
    assert json.loads(report["meta"]["config"]) == ckpt.config.to_json_dict()
    assert json.loads(report["meta"]["preprocessing"]) == ckpt.preprocessing.to_json_dict()
    assert json.loads(report["meta"]["source"])["format"] == "original"
    assert json.loads(report["meta"]["export"])["outputs"] == ["logits"]
    served = np.load(tmp_path / "y.npy")
    referee = parity_rule.referee_features(ckpt, images)["logits"]
    baseline = parity_rule.baseline_features(ckpt, images)["logits"]
    verdict = parity_rule.judge("logits", served, referee, parity_rule.scale_aware_error(baseline, referee))
    assert verdict.passed, verdict.message
    # Recognised, and refused as a source with the reason.
    assert converters.detect_format(dst) == "executorch"
    with pytest.raises(BadInputError, match="reading ExecuTorch programs is not supported"):
        converters.load(dst)


def test_export_is_deterministic_and_refuses_to_overwrite(small_program, tmp_path):
    ckpt, first = small_program
    second = tmp_path / "again.pte"
    converters.save(ckpt, second, "executorch", size=64)
    assert first.read_bytes() == second.read_bytes()
    with pytest.raises(BadInputError, match="already exists"):
        converters.save(ckpt, second, "executorch", size=64)


def test_a_program_failing_parity_is_not_written(small_program, tmp_path, monkeypatch):
    """The check runs in the ExecuTorch runtime before publishing: a program whose outputs are 1% off fails the
    rule, exit 1 through the command line, and leaves nothing behind."""
    ckpt, good = small_program
    run = executorch.run_program

    def one_percent_off(path, images, names):
        return {name: value * np.float32(1.01) for name, value in run(path, images, names).items()}

    monkeypatch.setattr(executorch, "program_bytes", lambda *args, **kwargs: good.read_bytes())
    monkeypatch.setattr(executorch, "run_program", one_percent_off)
    dest = tmp_path / "bad.pte"
    with pytest.raises(CheckFailedError, match=r"fails parity, nothing written: logits: .*failing: logits"):
        converters.save(ckpt, dest, "executorch", size=64)
    assert list(tmp_path.iterdir()) == []


def test_channels_last_weights_fail_to_lower_and_the_contiguous_copy_does_not(small_program):
    """The trap of exporting build_torch's fast model directly: its channels-last convolution weights stop
    XNNPACK lowering. Ours (contiguous_copy) lowered and passed the check in the fixture."""
    ckpt, good = small_program
    with pytest.raises(Exception) as caught:  # noqa: B017 (ExecuTorch raises a bare Exception)
        executorch.program_bytes(ckpt, 64, features=False, channels_last=True)
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("to be NCHW" in text for text in chain), chain
    assert good.stat().st_size > 0


def test_executorch_parity_runtime_and_unavailable_reduced_precision(small_program):
    ckpt, _ = small_program
    report = run_parity(ckpt, ["executorch"], dtypes=["float32", "float16"], image_size=64, batch=2)
    result = report.result("executorch")
    assert result.status == "pass", [(f.name, f.message) for f in result.features]
    assert [f.name for f in result.features if f.status == "pass"] == list(parity_rule.FEATURES)
    at_fp16 = report.result("executorch", "float16")
    assert at_fp16.status == "unavailable" and "not available at float16" in at_fp16.reason
    assert report.passed


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in SIZES_224 if v != "atto"])
def test_every_size_at_224(variant, tmp_path):
    """`convnextv2 parity CKPT --runtimes executorch` at 224 on every released size (atto: the matrix)."""
    src = tmp_path / f"{variant}.safetensors"
    write_fixture(src, variant, "canonical", seed=0)
    done = run_cli("parity", str(src), "--runtimes", "executorch", "--batch", "2", "--json")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    result = json.loads(done.stdout)["runtimes"][0]
    assert result["name"] == "executorch" and result["status"] == "pass"
