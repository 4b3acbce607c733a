"""The harness catches real bugs: each known porting trap (traps.py) is injected into ONE runtime, a patched
copy of the PyTorch reference; parity must fail for that runtime only, and the report must name the stage
where the bug first shows."""

from __future__ import annotations

import json

import pytest

from convnextv2.fixtures import make_checkpoint
from convnextv2.parity_tests.harness import FEATURES, run_parity
from convnextv2.parity_tests.traps import TRAPS, trap_runtime

pytestmark = pytest.mark.torch
CONFIG = "custom:depths=1,1,2,1;dims=8,16,32,64"
EXPECTED_FIRST_STAGE = {
    "grn-spectral-norm": "stage1",
    "gelu-tanh": "stage1",
    "final-ln-eps-1e-12": "pooled",
    "fast-variance-layernorm": "stem",
    "transposed-dwconv": "stage1",
    "bgr-stem": "stem",
}


def test_every_known_trap_has_an_expected_first_stage():
    assert set(TRAPS) == set(EXPECTED_FIRST_STAGE)


@pytest.mark.parametrize("name", list(TRAPS))
def test_injected_trap_fails_at_its_first_stage(name):
    trap = TRAPS[name]
    ckpt = make_checkpoint(CONFIG, seed=1)
    if trap.expose is not None:
        ckpt = trap.expose(ckpt)
    report = run_parity(ckpt, ["torch", trap_runtime(name)], image_size=64, batch=2, seed=3)
    clean, broken = report.result("torch"), report.result(f"torch-trap:{name}")
    # The weights that make the bug visible are legitimate weights: the correct runtime still passes on them.
    assert clean.status == "pass", [(f.name, f.message) for f in clean.features]
    assert broken.status == "fail"
    assert report.exit_code == 1
    assert broken.first_divergence == EXPECTED_FIRST_STAGE[name] == trap.first_stage
    first = FEATURES.index(broken.first_divergence)
    for feature in broken.features:
        if FEATURES.index(feature.name) < first:
            assert feature.status == "pass", f"{feature.name} should be untouched by {name}"
    diverged = broken.feature(broken.first_divergence)
    # Not a near miss: the bug is well above the tolerance, so no choice of floor could hide it.
    assert diverged.scale_aware_error > 10 * diverged.tolerance_scale_aware
    assert json.loads(json.dumps(report.to_json_dict()))["runtimes"][1]["first_divergence"] == trap.first_stage


def test_traps_need_their_exposing_weights_to_show():
    """The exposing weights are not decoration: on plain fixture weights the final-eps and fast-variance
    bugs stay below the float32 floor (which is why real checkpoints can hide them)."""
    ckpt = make_checkpoint(CONFIG, seed=1)
    report = run_parity(ckpt, [trap_runtime("final-ln-eps-1e-12"), trap_runtime("fast-variance-layernorm")],
                        image_size=64, batch=2, seed=3)
    pooled = report.result("torch-trap:final-ln-eps-1e-12").feature("pooled")
    assert pooled.scale_aware_error < 1e-4
    stem = report.result("torch-trap:fast-variance-layernorm").feature("stem")
    assert stem.scale_aware_error < 1e-4
