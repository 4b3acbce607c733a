"""The quantization rule (reference/quantization_rule.py): its metrics against formulas worked by hand, its margins
against the int8 yardstick on synthetic features, the yardstick's stem against torch's own fake-quantize ops and
observers, and int8 graphs made in the test by onnxruntime's own quantizer from our ONNX export (every stage an
output): a per-channel QDQ passes, GRN's arithmetic in int8 (asked for, or through quantize_static's default op
set) fails and names the stage where it first breaks; and one int8 QDQ file through ``convnextv2 parity
--artifact``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convnextv2.reference import parity_rule as rule
from convnextv2.reference import quantization_rule as qrule
from convnextv2.reference.errors import BadInputError

STAGES = ("stem", "stage1", "stage2", "stage3", "stage4", "pooled", "logits")


# ------------------------------------------------------------------ the metrics, against hand-worked numbers

def test_sqnr_is_the_worst_image_in_decibels():
    referee = np.ones((2, 10))
    value = referee.copy()
    value[0] += 0.1   # noise power 10 x 0.01 = 0.1 against a signal of 10: 20 dB
    value[1] += 0.01  # 10 x 1e-4 = 1e-3: 40 dB
    assert qrule.sqnr_db(value, referee) == pytest.approx(20.0, abs=1e-9)
    assert qrule.sqnr_db(value[1:], referee[1:]) == pytest.approx(40.0, abs=1e-9)


def test_sqnr_of_an_exact_copy_is_the_cap_and_of_noise_on_zeros_is_its_negative():
    referee = np.arange(12.0).reshape(3, 4)
    assert qrule.sqnr_db(referee.astype(np.float32), referee) == qrule.SQNR_CAP_DB
    assert qrule.sqnr_db(np.full((1, 4), 1e-3), np.zeros((1, 4))) == -qrule.SQNR_CAP_DB


def test_sqnr_of_a_sign_flip_is_minus_six_decibels():
    referee = np.array([[3.0, -4.0]])
    # noise (2x)^2 = 4 x signal: 10 log10(1/4)
    assert qrule.sqnr_db(-referee, referee) == pytest.approx(10 * math.log10(0.25))


def test_cosine_is_the_worst_image():
    referee = np.array([[1.0, 0.0], [0.0, 2.0]])
    value = np.array([[1.0, 1.0], [0.0, 5.0]])  # 45 degrees; parallel
    assert qrule.cosine(value, referee) == pytest.approx(1 / math.sqrt(2))


def test_top_k_agreement_counts_classes_by_hand():
    referee = np.array([[9.0, 8, 7, 6, 5, 4, 0], [0.0, 1, 2, 3, 4, 5, 6]])
    value = np.array([[8.0, 9, 7, 6, 0, 4, 5],   # top-1 1 (referee 0); top-5 {1,0,2,3,6}: 4 of {0,1,2,3,4}
                      [0.0, 1, 2, 3, 4, 5, 6]])  # identical
    assert qrule.top_k_agreement(value, referee, 1) == pytest.approx(0.5)
    assert qrule.top_k_agreement(value, referee, 5) == pytest.approx((4 / 5 + 1) / 2)


# ------------------------------------------------------------------ the verdict on synthetic features

def _referee(headless: bool = False, seed: int = 0) -> rule.Referee:
    rng = np.random.default_rng(seed)
    shapes = {"stem": (4, 8, 8, 8), "stage1": (4, 8, 8, 8), "stage2": (4, 16, 4, 4), "stage3": (4, 32, 2, 2),
              "stage4": (4, 64, 1, 1), "pooled": (4, 64), "logits": (4, 100)}
    features = {name: rng.standard_normal(shape) for name, shape in shapes.items()
                if not (headless and name == "logits")}
    return rule.Referee.from_features(np.zeros((4, 3, 32, 32), np.float32), features, {"float32": features})


def _at_sqnr(referee: np.ndarray, db: float, seed: int) -> np.ndarray:
    """``referee`` plus noise scaled so that every image's SQNR is exactly ``db``."""
    noise = np.random.default_rng(seed).standard_normal(referee.shape)
    flat_ref, flat_noise = referee.reshape(len(referee), -1), noise.reshape(len(noise), -1)
    scale = np.sqrt(np.sum(flat_ref ** 2, axis=1) / np.sum(flat_noise ** 2, axis=1) / 10 ** (db / 10))
    return referee + (flat_noise * scale[:, None]).reshape(referee.shape)


YARD_DB = 30.0  # the synthetic yardstick's SQNR on every stage


def _yardstick(referee: rule.Referee) -> dict[str, np.ndarray]:
    return {name: _at_sqnr(value, YARD_DB, 100 + i) for i, (name, value) in enumerate(referee.features.items())}


def test_stage_problems_applies_the_margins_by_hand():
    limits = {"sqnr_margin_db": 5.0, "cosine_margin_db": 10.0, "top1_margin": 0.25, "top5_margin": 0.5}
    yard = {"sqnr_db": 20.0, "cosine": 0.99, "top1_agreement": 1.0, "top5_agreement": 1.0}
    # 15 dB is the floor (20 - 5); cosine distance 0.01 x 10 (10 dB) = 0.1: the floor is 0.9.
    assert qrule.stage_problems("stage2", {"sqnr_db": 15.0, "cosine": 0.9}, yard, limits) == []
    problems = qrule.stage_problems("stage2", {"sqnr_db": 14.9, "cosine": 0.899}, yard, limits)
    assert len(problems) == 2 and "15.0 dB" in problems[0] and "0.9000" in problems[1]
    # top-k only at the logits: 0.75 is the top-1 floor, 0.5 the top-5 one.
    clean = {"sqnr_db": 30.0, "cosine": 0.999}
    assert qrule.stage_problems("logits", {**clean, "top1_agreement": 0.75, "top5_agreement": 0.5}, yard, limits) == []
    assert [p.split(" agreement")[0] for p in qrule.stage_problems(
        "logits", {**clean, "top1_agreement": 0.5, "top5_agreement": 0.4}, yard, limits)] == ["top-1", "top-5"]
    assert qrule.stage_problems("pooled", {**clean, "top1_agreement": 0.0}, yard, limits) == []


def test_a_stage_beyond_the_margin_below_the_yardstick_is_the_first_failing_one():
    referee = _referee()
    margin = qrule.THRESHOLDS["sqnr_margin_db"]
    db = {"stem": YARD_DB + 5, "stage1": YARD_DB - margin + 1, "stage2": YARD_DB - margin - 2,
          "stage3": YARD_DB - margin - 6}
    produced = {name: _at_sqnr(referee.features[name], db.get(name, YARD_DB), i) for i, name in enumerate(STAGES)}
    judged = qrule.judge_quantized(produced, referee, _yardstick(referee))
    assert judged.status == "fail" and judged.first_failing == "stage2"
    assert judged.metrics["sqnr_db"]["stage2"] == pytest.approx(YARD_DB - margin - 2)
    assert judged.metrics["yardstick_sqnr_db"]["stage2"] == pytest.approx(YARD_DB)
    assert [s.name for s in judged.stages if s.status == "fail"][:2] == ["stage2", "stage3"]
    assert "stage2" in judged.reason and "SQNR" in judged.reason and "yardstick" in judged.reason
    assert set(judged.metrics) == {"sqnr_db", "cosine", "top1_agreement", "top5_agreement", "yardstick_sqnr_db",
                                   "yardstick_cosine", "yardstick_top1_agreement", "yardstick_top5_agreement",
                                   "thresholds"}


def test_features_within_the_margin_pass_and_top_k_is_reported():
    referee = _referee()
    produced = {name: _at_sqnr(referee.features[name], YARD_DB - qrule.THRESHOLDS["sqnr_margin_db"] + 0.5, i)
                for i, name in enumerate(STAGES)}
    judged = qrule.judge_quantized(produced, referee, _yardstick(referee))
    assert judged.status == "pass" and judged.first_failing is None, judged.reason
    assert judged.metrics["top1_agreement"] == 1.0 and judged.metrics["thresholds"] == qrule.THRESHOLDS


def test_the_final_output_alone_is_judged_and_other_stages_are_not_exposed():
    referee = _referee()
    judged = qrule.judge_quantized({"logits": referee.features["logits"].copy()}, referee, _yardstick(referee))
    assert judged.status == "pass" and list(judged.metrics["sqnr_db"]) == ["logits"]
    assert list(judged.metrics["yardstick_sqnr_db"]) == ["logits"]
    results = qrule.feature_results(judged, referee)
    assert [r.name for r in results] == list(STAGES)
    assert [r.status for r in results] == ["not-exposed"] * 6 + ["pass"]
    assert results[-1].top1_agreement == 1.0 and results[-1].cosine_similarity == pytest.approx(1.0)


def test_missing_final_output_is_refused_by_name():
    referee = _referee()
    with pytest.raises(BadInputError, match="'logits' is missing"):
        qrule.judge_quantized({"stem": referee.features["stem"]}, referee, _yardstick(referee))


def test_headless_checkpoint_is_judged_on_pooled_without_top_k():
    referee = _referee(headless=True)
    judged = qrule.judge_quantized({"pooled": _at_sqnr(referee.features["pooled"], 2, 1)}, referee,
                                   _yardstick(referee))
    assert judged.first_failing == "pooled" and judged.metrics["top1_agreement"] is None
    assert judged.metrics["yardstick_top1_agreement"] is None


def test_top1_disagreement_fails_the_logits_even_at_a_good_sqnr():
    referee = _referee()
    logits = referee.features["logits"]
    swapped = logits.copy()
    # Swap each image's two best classes: a tiny change in SQNR terms, the class changes on every image.
    order = np.argsort(-logits, axis=1)
    rows = np.arange(len(logits))
    swapped[rows, order[:, 0]], swapped[rows, order[:, 1]] = logits[rows, order[:, 1]], logits[rows, order[:, 0]]
    judged = qrule.judge_quantized({"logits": swapped}, referee, {"logits": logits.copy()})
    assert judged.metrics["top1_agreement"] == 0.0 and judged.metrics["yardstick_top1_agreement"] == 1.0
    assert judged.status == "fail" and judged.first_failing == "logits" and "top-1 agreement" in judged.reason


def test_non_finite_and_misshapen_stages_fail():
    referee = _referee()
    produced = {name: referee.features[name].copy() for name in STAGES}
    produced["stage1"][0, 0, 0, 0] = np.nan
    produced["stage3"] = produced["stage3"][:, :16]
    judged = qrule.judge_quantized(produced, referee, _yardstick(referee))
    assert judged.first_failing == "stage1"
    messages = {s.name: s.message for s in judged.stages}
    assert messages["stage1"] == "non-finite values" and "shape" in messages["stage3"]


# ------------------------------------------------------------------ the yardstick against torch's own quantizer

def test_yardstick_stem_is_torch_fake_quantized_conv_then_float_layernorm():
    """The stem is one Conv2d and a LayerNorm: the yardstick's must equal the conv run on input fake-quantized
    by torch's MinMaxObserver (uint8, per tensor, over the calibration images) and weights by its per-channel
    symmetric observer (-127..127), the LayerNorm in float."""
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

    from convnextv2.fixtures import make_checkpoint

    ckpt = make_checkpoint("atto", seed=0, fmt="canonical")
    images = rule.seeded_images(2, 64, seed=0)
    calibration = rule.seeded_images(3, 64, seed=7)
    yard = qrule.int8_yardstick(ckpt, images, calibration_seed=7, calibration_images=3)

    acts = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    acts(torch.from_numpy(calibration))
    scale, zero = (float(v) for v in acts.calculate_qparams())
    weight = torch.from_numpy(np.asarray(ckpt.tensors["stem.conv.weight"], np.float32))
    weights = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                       quant_min=-127, quant_max=127)
    weights(weight)
    w_scale, w_zero = weights.calculate_qparams()
    w = torch.fake_quantize_per_channel_affine(weight, w_scale, w_zero.int(), 0, -127, 127).double()
    x = torch.fake_quantize_per_tensor_affine(torch.from_numpy(images), scale, int(zero), 0, 255).double()
    conv = torch.nn.functional.conv2d(x, w, torch.from_numpy(np.asarray(ckpt.tensors["stem.conv.bias"], np.float64)),
                                      stride=4)
    expected = torch.nn.functional.layer_norm(
        conv.permute(0, 2, 3, 1), (conv.shape[1],),
        torch.from_numpy(np.asarray(ckpt.tensors["stem.norm.weight"], np.float64)),
        torch.from_numpy(np.asarray(ckpt.tensors["stem.norm.bias"], np.float64)), 1e-6).permute(0, 3, 1, 2).numpy()
    # torch's fake-quantize runs in float32: an input on a rounding boundary may land one step apart.
    close = np.isclose(yard["stem"], expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert close.mean() > 0.999, f"{(~close).sum()} of {close.size} differ"
    # And it is quantized: not the float64 referee.
    referee = rule.referee_features(ckpt, images)
    assert 20 < qrule.sqnr_db(yard["stem"], referee["stem"]) < 60
    assert 10 < qrule.sqnr_db(yard["logits"], referee["logits"]) < 60


# ------------------------------------------------------------------ int8 graphs made by onnxruntime's quantizer

@pytest.fixture(scope="module")
def quantizable(tmp_path_factory):
    """atto with trained-like scales (fixtures/trained_like.py: plain fixture weights quantize alike whatever the
    recipe), exported with every stage as an output; its referee; calibration images distinct from the judged;
    the int8 yardstick on the judged images."""
    pytest.importorskip("onnxruntime")
    from convnextv2.converters.onnx import export
    from convnextv2.fixtures import make_checkpoint
    from convnextv2.fixtures.trained_like import trained_like

    ckpt = trained_like(make_checkpoint("atto", seed=0, fmt="canonical"))
    path = tmp_path_factory.mktemp("quant") / "atto.onnx"
    export.write(ckpt, path, size=SIZE, features=True)
    referee = rule.Referee.build(ckpt, rule.seeded_images(8, SIZE, seed=0), precisions=())
    return path, referee, rule.seeded_images(16, SIZE, seed=1000), qrule.int8_yardstick(ckpt, referee.images)


SIZE = 224  # as the sweep: the GRN sums run over 56 x 56 maps, where int8 breaks them


def _quantize(source, target, calibration, **options):
    import onnx
    from onnxruntime import quantization as oq

    class Images(oq.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"pixel_values": calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.feeds, None)

    model = onnx.load(str(source))
    # Our export writes GRN's sum of squares over H x W as a MatMul of a ones matrix with x*x.
    options.setdefault("nodes_to_exclude", [n.name for n in model.graph.node if n.op_type == "MatMul"
                                            and any(i.startswith("ones") for i in n.input)])
    oq.quantize_static(str(source), str(target), Images(), quant_format=oq.QuantFormat.QDQ,
                       activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8, **options)
    return target


def _judge(path, referee, yardstick):
    from convnextv2.converters.onnx.session import ort_session, run_ort

    produced = run_ort(ort_session(path, threads=2, optimise=False), referee.images)
    return qrule.judge_quantized({k: v for k, v in produced.items() if k in rule.FEATURES}, referee, yardstick)


CONV = ["Conv", "MatMul", "Gemm"]


def test_per_channel_qdq_passes(quantizable, tmp_path):
    source, referee, calibration, yardstick = quantizable
    judged = _judge(_quantize(source, tmp_path / "good.onnx", calibration, per_channel=True,
                              op_types_to_quantize=CONV), referee, yardstick)
    assert judged.status == "pass", judged.reason
    assert list(judged.metrics["sqnr_db"]) == list(STAGES)
    # Noise is there (it is int8), within the margin of the yardstick's on every stage.
    assert min(judged.metrics["sqnr_db"].values()) < 60
    assert all(judged.metrics["sqnr_db"][s] > judged.metrics["yardstick_sqnr_db"][s] - qrule.THRESHOLDS[
        "sqnr_margin_db"] for s in STAGES)


def test_grn_in_int8_fails_where_grn_first_breaks(quantizable, tmp_path):
    import onnx

    source, referee, calibration, yardstick = quantizable
    model = onnx.load(str(source))
    made_by = {out: n for n in model.graph.node for out in n.output}
    # GRN: the ones-matrix MatMul (sum of squares), Sqrt, then ReduceMean and Div of the reshaped norms (the
    # head's ReduceMean, the global pooling, reads stage4 itself).
    grn = [n.name for n in model.graph.node if (n.op_type == "MatMul" and any(i.startswith("ones") for i in n.input))
           or n.op_type in ("Sqrt", "Div")
           or (n.op_type == "ReduceMean" and made_by.get(n.input[0]) is not None
               and made_by[n.input[0]].op_type == "Reshape")]
    weights = [n.name for n in model.graph.node if n.op_type in CONV]
    judged = _judge(_quantize(source, tmp_path / "grn.onnx", calibration, per_channel=True,
                              op_types_to_quantize=[*CONV, "Sqrt", "ReduceMean", "Div"],
                              nodes_to_quantize=weights + grn,
                              nodes_to_exclude=[]), referee, yardstick)
    assert judged.status == "fail" and judged.first_failing == GRN_FIRST_FAILING, judged.reason
    # The stem has no GRN: it passes.
    assert judged.stages[0].name == "stem" and judged.stages[0].status == "pass"


def test_quantize_static_default_op_set_fails(quantizable, tmp_path):
    """Without op_types_to_quantize onnxruntime quantizes every op it knows: LayerNormalization and our GRN's
    sum-of-squares MatMul too."""
    source, referee, calibration, yardstick = quantizable
    judged = _judge(_quantize(source, tmp_path / "default.onnx", calibration, per_channel=True,
                              nodes_to_exclude=[]), referee, yardstick)
    assert judged.status == "fail" and judged.first_failing == DEFAULT_OPS_FIRST_FAILING, judged.reason


# As the sweep measured (atto, trained-like): GRN in int8 falls 9-10 dB below the yardstick at stage2 (the
# stem has no GRN; stage1's gap, 5-6 dB, is within the margin).
GRN_FIRST_FAILING = "stage2"
DEFAULT_OPS_FIRST_FAILING = "stage2"


# ------------------------------------------------------------------ through the CLI

@pytest.mark.slow  # the CLI's referee, localisation and yardstick: about two minutes on 2 busy cores
def test_int8_qdq_artifact_through_the_cli_passes_with_its_metrics(quantizable, tmp_path):
    """``convnextv2 parity SRC --runtimes none --artifact q.onnx --json``: our plain export (logits only)
    quantized by quantize_static per channel is found to be int8 and judged by the quantization rule."""
    import json

    from click.testing import CliRunner

    from convnextv2.converters import canonical
    from convnextv2.converters.cli import main
    from convnextv2.converters.onnx import export
    from convnextv2.fixtures import make_checkpoint
    from convnextv2.fixtures.trained_like import trained_like

    ckpt = trained_like(make_checkpoint("atto", seed=0, fmt="canonical"))
    source = tmp_path / "atto.safetensors"
    canonical.write(ckpt, source)
    export.write(ckpt, tmp_path / "float.onnx", size=SIZE, features=False)
    artifact = _quantize(tmp_path / "float.onnx", tmp_path / "q.onnx", quantizable[2], per_channel=True,
                         op_types_to_quantize=CONV)
    result = CliRunner().invoke(main, ["parity", str(source), "--runtimes", "none", "--image-size", str(SIZE),
                                       "--batch", "4", "--no-cache", "--artifact", str(artifact), "--json"],
                                env={"CONVNEXTV2_PROGRESS": "0"})
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.stdout)["artifacts"]
    assert entry["status"] == "pass" and entry["precision"] == "int8", entry["reason"]
    metrics = entry["metrics"]
    assert metrics["thresholds"] == qrule.THRESHOLDS
    assert "logits" in metrics["sqnr_db"] and "logits" in metrics["yardstick_sqnr_db"]
    assert metrics["top1_agreement"] is not None and metrics["yardstick_top1_agreement"] is not None
