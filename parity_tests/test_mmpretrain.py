"""OpenMMLab mmpretrain checkpoints (converters/mmpretrain.py), both ways, and a ConvNeXt V2 backbone inside a
detector.

The oracle is mmpretrain 1.2 itself (tests marked ``mmpretrain``; ``nox -s tests_mmpretrain`` installs it into a
site dir of its own, constraints-mmpretrain.txt): it builds the models from its registry, writes checkpoints with
mmengine, loads ours with ``strict=True`` and computes the float64 logits and stage features ours must match.
The unmarked tests need no mmpretrain: our own round trips, sniffing, what is kept and what is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convnextv2 import converters, fixtures
from convnextv2.converters import mmpretrain as mm_format
from convnextv2.converters.cli import main
from convnextv2.converters.torchzip import read_torch_zip, write_torch_zip
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError

# Set by `nox -s tests_mmpretrain` to the pinned version: the marked tests then fail, never skip, without it.
EXPECT_ENV = "CONVNEXTV2_EXPECT_MMPRETRAIN"
CUSTOM_ARCH = {"depths": [2, 1, 3, 1], "channels": [24, 48, 72, 96]}
ATTO_ARCH = {"depths": [2, 2, 6, 2], "channels": [40, 80, 160, 320]}
# Both sides in float64: what is left is summation order, some 1e-16 of the values.
FLOAT64_BAR = 1e-12
IMAGE_SIZE = 64
mmpretrain_only = pytest.mark.mmpretrain


def _original_fixture(path: Path, num_classes: int = 10, variant: str = "atto", seed: int = 1) -> Path:
    fixtures.write_fixture(path, variant, "original", seed=seed, num_classes=num_classes)
    return path


def _to_mmpretrain(src: Path, dest: Path) -> Path:
    converters.save(converters.load(src), dest, format="mmpretrain")
    return dest


def _same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name, array in a.items():
        other = np.ascontiguousarray(b[name])
        assert array.dtype == other.dtype and array.shape == other.shape, name
        assert np.ascontiguousarray(array).tobytes() == other.tobytes(), name


# ------------------------------------------------------------ our own round trips (no mmpretrain needed)

def test_written_file_is_sniffed_and_reads_back_exactly(tmp_path):
    src = _original_fixture(tmp_path / "src.pt")
    out = _to_mmpretrain(src, tmp_path / "model.pth")
    assert converters.detect_format(out) == "mmpretrain"
    assert converters.detect_format(src) == "original"  # original's files are not claimed
    original, back = converters.load(src), converters.load(out)
    _same_tensors(original.model_tensors(), back.model_tensors())
    assert back.config == original.config and back.preprocessing == original.preprocessing
    stored = read_torch_zip(out)
    assert list(stored) == ["meta", "state_dict"]
    state = stored["state_dict"]
    assert isinstance(state, collections.OrderedDict)
    assert state["backbone.stages.0.0.grn.gamma"].shape == (160,)  # (4C,), as mmpretrain's GRN
    assert list(state)[-4:] == ["backbone.norm3.weight", "backbone.norm3.bias", "head.fc.weight", "head.fc.bias"]
    block = [k[len("backbone.stages.0.0."):] for k in state if k.startswith("backbone.stages.0.0.")]
    assert block == ["depthwise_conv.weight", "depthwise_conv.bias", "norm.weight", "norm.bias",
                     "pointwise_conv1.weight", "pointwise_conv1.bias", "pointwise_conv2.weight",
                     "pointwise_conv2.bias", "grn.gamma", "grn.beta"]


def test_mmpretrain_to_canonical_to_mmpretrain_is_byte_identical(tmp_path):
    # The same file name in two folders: a torch zip's archive name is its file's stem.
    (tmp_path / "a").mkdir()
    first = _to_mmpretrain(_original_fixture(tmp_path / "src.pt"), tmp_path / "a" / "m.pth")
    canonical = tmp_path / "m.safetensors"
    converters.save(converters.load(first), canonical, format="canonical")
    (tmp_path / "b").mkdir()
    again = _to_mmpretrain(canonical, tmp_path / "b" / "m.pth")
    assert first.read_bytes() == again.read_bytes()


def test_headless_encoder_is_written_without_a_norm(tmp_path):
    src = tmp_path / "fcmae.pt"
    fixtures.write_fixture(src, "atto", "fcmae", seed=2)
    out = _to_mmpretrain(src, tmp_path / "fcmae.pth")
    state = read_torch_zip(out)["state_dict"]
    assert all(k.startswith("backbone.") for k in state)
    assert not any(k.startswith("backbone.norm") for k in state)
    back = converters.load(out)
    assert back.config.num_classes == 0 and not back.config.head_norm
    _same_tensors(converters.load(src).model_tensors(), back.model_tensors())


def _state_of(path: Path) -> collections.OrderedDict:
    return collections.OrderedDict(read_torch_zip(path)["state_dict"])


def test_a_bare_backbone_state_dict_and_a_ddp_prefix_read(tmp_path):
    ours = _to_mmpretrain(_original_fixture(tmp_path / "src.pt"), tmp_path / "m.pth")
    expected = converters.load(ours)
    state = _state_of(ours)
    bare = collections.OrderedDict((k[len("backbone."):], v) for k, v in state.items() if k.startswith("backbone."))
    write_torch_zip(tmp_path / "bare.pth", bare)
    headless = converters.load(tmp_path / "bare.pth")
    assert headless.config.num_classes == 0 and headless.config.head_norm
    assert headless.info["container"] == "bare"
    ddp = collections.OrderedDict(("module." + k, v) for k, v in state.items())
    write_torch_zip(tmp_path / "ddp.pth", {"state_dict": ddp})
    wrapped = converters.load(tmp_path / "ddp.pth")
    _same_tensors(expected.model_tensors(), wrapped.model_tensors())  # the head beside module.backbone. comes too
    assert wrapped.source.layout["prefix"] == "module.backbone."


def _with_stage_norms(state: collections.OrderedDict, dims: list[int]) -> collections.OrderedDict:
    """A detector backbone's state dict: no head, one LayerNorm per stage (norm0..3), a neck and heads beside."""
    rng = np.random.default_rng(7)
    out = collections.OrderedDict((k, v) for k, v in state.items()
                                  if k.startswith("backbone.") and not k.startswith("backbone.norm3."))
    for i, width in enumerate(dims):
        out[f"backbone.norm{i}.weight"] = (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)
        out[f"backbone.norm{i}.bias"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
    for i, width in enumerate(dims):
        out[f"neck.lateral_convs.{i}.conv.weight"] = rng.standard_normal((16, width, 1, 1)).astype(np.float32)
    out["rpn_head.rpn_conv.weight"] = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    return out


def test_detector_backbone_reads_headless_and_its_stage_norms_go_back(tmp_path):
    ours = _to_mmpretrain(_original_fixture(tmp_path / "src.pt"), tmp_path / "m.pth")
    detector = _with_stage_norms(_state_of(ours), ATTO_ARCH["channels"])
    write_torch_zip(tmp_path / "det.pth", {"meta": {"epoch": 12}, "state_dict": detector})
    ckpt = converters.load(tmp_path / "det.pth")
    assert ckpt.config.num_classes == 0 and not ckpt.config.head_norm
    assert sorted(ckpt.extras()) == sorted(f"extras.mmpretrain.norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert ckpt.source.layout["left_behind"] == {"neck.": 4, "rpn_head.": 1}
    assert ckpt.source.layout["meta"] == {"epoch": 12}
    said: list[str] = []
    converters.save(ckpt, tmp_path / "back.pth", format="mmpretrain", warn=said.append)
    assert said == []  # the stage norms have their place
    written = _state_of(tmp_path / "back.pth")
    assert list(written) == [k for k in detector if k.startswith("backbone.")]
    for key, array in written.items():
        assert np.array_equal(array, detector[key]), key
    # Elsewhere they are extras no other format holds: declared, not dropped silently.
    converters.save(ckpt, tmp_path / "fcmae.pt", format="original", warn=said.append)
    assert len(said) == 1 and "8 extras tensor(s) not written" in said[0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_data_preprocessor_buffers_state_the_normalisation(tmp_path, dtype):
    ours = _to_mmpretrain(_original_fixture(tmp_path / "src.pt"), tmp_path / "m.pth")
    state = _state_of(ours)
    pixels = collections.OrderedDict([
        ("data_preprocessor.mean", np.array([123.675, 116.28, 103.53], dtype).reshape(3, 1, 1)),
        ("data_preprocessor.std", np.array([58.395, 57.12, 57.375], dtype).reshape(3, 1, 1)),
    ])
    write_torch_zip(tmp_path / "dp.pth", {"meta": {}, "state_dict": collections.OrderedDict([*pixels.items(),
                                                                                             *state.items()])})
    ckpt = converters.load(tmp_path / "dp.pth")
    assert ckpt.preprocessing.origin == "read"
    assert ckpt.preprocessing.mean == (0.485, 0.456, 0.406) and ckpt.preprocessing.std == (0.229, 0.224, 0.225)
    assert "left_behind" not in ckpt.source.layout
    (tmp_path / "again").mkdir()
    converters.save(ckpt, tmp_path / "again" / "dp.pth", format="mmpretrain")
    back = _state_of(tmp_path / "again" / "dp.pth")
    assert list(back)[:2] == list(pixels)
    for key, array in pixels.items():
        assert back[key].dtype == array.dtype and back[key].tobytes() == array.tobytes(), key
    # Another normalisation stated at a conversion goes into the buffers.
    ckpt.preprocessing = dataclasses.replace(ckpt.preprocessing, mean=(0.5, 0.5, 0.5)).with_origin("set")
    converters.save(ckpt, tmp_path / "set.pth", format="mmpretrain")
    assert _state_of(tmp_path / "set.pth")["data_preprocessor.mean"].ravel().tolist() == [127.5] * 3
    assert converters.load(tmp_path / "set.pth").preprocessing == ckpt.preprocessing
    # Without the toolkit's metadata (a file mmpretrain wrote), an assumed preprocessing says so.
    assert converters.load(tmp_path / "m.pth").preprocessing.origin == "assumed"


def test_meta_is_kept_and_the_class_names_found(tmp_path):
    ours = _to_mmpretrain(_original_fixture(tmp_path / "src.pt", num_classes=3), tmp_path / "m.pth")
    meta = {"dataset_meta": {"classes": ("cat", "dog", "bird")}, "epoch": 300, "seed": 0,
            "mmengine_version": "0.10.7", "hook_msgs": {"last_ckpt": "work_dirs/epoch_300.pth"}}
    optimizer = {"state": {}, "param_groups": [{"lr": 4e-3, "weight_decay": 0.05}]}
    write_torch_zip(tmp_path / "meta.pth", {"meta": meta, "state_dict": _state_of(ours), "optimizer": optimizer})
    ckpt = converters.load(tmp_path / "meta.pth")
    assert ckpt.info["skipped"] == {"optimizer": {}}
    assert ckpt.source.layout["meta"] == json.loads(json.dumps(meta))
    assert mm_format.class_names(ckpt) == ["cat", "dog", "bird"]
    (tmp_path / "b").mkdir()
    converters.save(ckpt, tmp_path / "b" / "meta.pth", format="mmpretrain")
    written = read_torch_zip(tmp_path / "b" / "meta.pth")
    assert list(written) == ["meta", "state_dict"]
    assert {k: v for k, v in written["meta"].items() if k != "convnextv2-toolkit"} == json.loads(json.dumps(meta))
    back = converters.load(tmp_path / "b" / "meta.pth")
    assert mm_format.class_names(back) == ["cat", "dog", "bird"]
    assert "skipped" not in back.info  # the optimizer is not in the file written


def test_other_final_norm_eps_and_other_extras_are_declared(tmp_path):
    ckpt = fixtures.make_checkpoint("atto", seed=3, fmt="fcmae-sparse")
    said: list[str] = []
    converters.save(ckpt, tmp_path / "s.pth", format="mmpretrain", warn=said.append)
    assert len(said) == 1 and "extras tensor(s) not written (an mmpretrain model" in said[0]
    eps = fixtures.make_checkpoint("atto", seed=3, fmt="canonical", num_classes=5)
    eps.config = eps.config.with_(head_norm_eps=1e-12)
    said.clear()
    converters.save(eps, tmp_path / "e.pth", format="mmpretrain", warn=said.append)
    assert len(said) == 1 and "final LayerNorm eps 1e-12 -> 1e-06" in said[0]
    assert converters.load(tmp_path / "e.pth").config.head_norm_eps == 1e-6


def test_two_backbones_need_a_prefix_in_the_cli(tmp_path):
    state = _state_of(_to_mmpretrain(_original_fixture(tmp_path / "src.pt"), tmp_path / "m.pth"))
    other = _state_of(_to_mmpretrain(_original_fixture(tmp_path / "o.pt", seed=4), tmp_path / "o.pth"))
    both = collections.OrderedDict([*(("student." + k, v) for k, v in state.items()),
                                    *(("teacher." + k, v) for k, v in other.items())])
    path = tmp_path / "distill.pth"
    write_torch_zip(path, {"meta": {}, "state_dict": both})
    runner = CliRunner()
    out = tmp_path / "student.pth"
    refused = runner.invoke(main, ["convert", str(path), "-o", str(out), "--to", "mmpretrain"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        f"error: {path}: 2 ConvNeXt V2 models in the file, under 'student.backbone.', 'teacher.backbone.'; "
        "choose one with --prefix"]
    assert not out.exists()
    done = runner.invoke(main, ["convert", str(path), "-o", str(out), "--to", "mmpretrain",
                                "--prefix", "student.backbone."])
    assert done.exit_code == 0, done.output
    student = converters.load(out)
    _same_tensors(converters.load(tmp_path / "m.pth").model_tensors(), student.model_tensors())
    assert student.source.layout["prefix"] == "student.backbone."
    assert student.source.layout["left_behind"] == {"teacher.": len(other)}
    shown = runner.invoke(main, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["format"] == "mmpretrain"


def test_cli_converts_to_mmpretrain_and_inspects(tmp_path):
    src = _original_fixture(tmp_path / "src.pt")
    out = tmp_path / "cls.pth"
    runner = CliRunner()
    done = runner.invoke(main, ["convert", str(src), "-o", str(out), "--to", "mmpretrain"])
    assert done.exit_code == 0, done.output
    shown = runner.invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "mmpretrain" in shown.output and "10" in shown.output


@pytest.mark.parametrize(("case", "expected"), [
    ("meta-not-a-dict", r"'meta' is a list, expected a dict"),
    ("stage-norms-beside-a-head", r"per-stage output norms .* beside a classifier head"),
    ("half-a-preprocessor", r"data_preprocessor\.std: expected 3 floats .* found absent"),
    ("layer-scale", r"stages\.0\.0\.gamma"),
])
def test_malformed_files_are_refused_in_one_line(tmp_path, case, expected):
    state = _state_of(_to_mmpretrain(_original_fixture(tmp_path / "src.pt"), tmp_path / "m.pth"))
    meta: object = {}
    if case == "meta-not-a-dict":
        meta = ["not", "a", "dict"]
    elif case == "stage-norms-beside-a-head":
        state["backbone.norm0.weight"] = np.ones(40, np.float32)
    elif case == "half-a-preprocessor":
        state["data_preprocessor.mean"] = np.zeros((3, 1, 1), np.float32)
    else:  # ConvNeXt V1's per-block layer scale
        state["backbone.stages.0.0.gamma"] = np.ones(40, np.float32)
    path = tmp_path / "bad.pth"
    write_torch_zip(path, {"meta": meta, "state_dict": state})
    with pytest.raises(BadInputError, match=expected) as info:
        converters.load(path, format="mmpretrain")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------ against mmpretrain 1.2 itself

@pytest.fixture(scope="module")
def mm():
    """mmpretrain's registry and mmengine's checkpoint functions. Under `nox -s tests_mmpretrain` a missing or
    other mmpretrain fails here; elsewhere these tests are deselected (parity_tests/plugin.py)."""
    from convnextv2.converters.peer_imports import import_torchvision_guarded

    import_torchvision_guarded()
    with warnings.catch_warnings():
        # mmcv-lite has no compiled ops (deformable attention): ConvNeXt uses none.
        warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention", category=UserWarning)
        import mmengine.runner.checkpoint as checkpoint
        import mmpretrain
        import mmpretrain.models  # noqa: F401  (registers ImageClassifier, ConvNeXt, LinearClsHead)
        from mmpretrain.registry import MODELS

    expected = os.environ.get(EXPECT_ENV)
    if expected:
        assert mmpretrain.__version__ == expected, f"{EXPECT_ENV}={expected}, but mmpretrain {mmpretrain.__version__}"
    return MODELS, checkpoint


def _classifier(mm, arch, num_classes: int):
    models, _ = mm
    return models.build({"type": "ImageClassifier",
                         "backbone": {"type": "ConvNeXt", "arch": arch, "use_grn": True, "layer_scale_init_value": 0.},
                         "head": {"type": "LinearClsHead", "num_classes": num_classes,
                                  "in_channels": (arch if isinstance(arch, dict) else ATTO_ARCH)["channels"][-1]}})


def _randomize(model, seed: int):
    """Seeded weights with every parameter away from its identity value (GRN at 0/0 would be the identity)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(0.02 * noise)
            elif name.endswith("grn.gamma"):
                param.copy_(0.3 * noise)
            elif name.endswith("grn.beta") or name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:  # LayerNorm weights
                param.copy_(1 + 0.1 * noise)
    model.eval()  # mmpretrain's ConvNeXt.train() returns None, so not chained
    return model


def _float64(model, images: np.ndarray, **kwargs):
    import torch

    with torch.no_grad():
        out = model.double()(torch.from_numpy(images).double(), **kwargs)
    return out


def _assert_float64_close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.max(np.abs(ours))))
    err = float(np.max(np.abs(ours - theirs)))
    assert err <= FLOAT64_BAR * scale, f"{what}: max|d| {err:.3e} in float64 (scale {scale:.3g})"
    assert float(np.max(np.abs(theirs))) > 1e-3, f"{what}: outputs near zero prove nothing"
    print(f"{what}: float64 max|d| {err:.2e} (scale {scale:.3g})")


@mmpretrain_only
@pytest.mark.parametrize("arch", ["atto", CUSTOM_ARCH], ids=["atto", "custom"])
def test_a_checkpoint_mmengine_saved_reads_and_its_logits_match(tmp_path, mm, arch):
    import torch

    _, checkpoint = mm
    model = _randomize(_classifier(mm, arch, 7), seed=11)
    classes = [f"class{i}" for i in range(7)]
    meta = {"dataset_meta": {"classes": classes}, "epoch": 300, "iter": 1200, "seed": 0,
            "mmengine_version": "0.10.7", "experiment_name": "convnext-v2_in1k", "time": "20230104_120000"}
    path = tmp_path / "epoch_300.pth"
    checkpoint.save_checkpoint({"meta": meta, "state_dict": checkpoint.weights_to_cpu(model.state_dict())}, str(path))
    assert converters.detect_format(path) == "mmpretrain"
    ckpt = converters.load(path)
    assert ckpt.config.num_classes == 7 and mm_format.class_names(ckpt) == classes
    assert ckpt.preprocessing.origin == "assumed"
    images = parity_rule.seeded_images(2, IMAGE_SIZE, parity_rule.DEFAULT_SEED)
    theirs = _float64(model, images, mode="tensor").numpy()
    ours = parity_rule.referee_features(ckpt, images)["logits"]
    _assert_float64_close(ours, theirs, f"logits ({arch})")

    # mmpretrain -> canonical -> mmpretrain: the state dict mmpretrain wrote, bit for bit, in its order.
    canonical = tmp_path / "c.safetensors"
    converters.save(ckpt, canonical, format="canonical")
    back = tmp_path / "back.pth"
    converters.save(converters.load(canonical), back, format="mmpretrain")
    first, second = (torch.load(p, map_location="cpu") for p in (path, back))  # weights_only, torch's default
    assert list(second["state_dict"]) == list(first["state_dict"])
    for key, tensor in first["state_dict"].items():
        other = second["state_dict"][key]
        assert other.dtype == tensor.dtype and torch.equal(other, tensor), key
    assert {k: v for k, v in second["meta"].items() if k != "convnextv2-toolkit"} == meta


@mmpretrain_only
@pytest.mark.parametrize("variant", ["atto", "custom:depths=2,1,3,1;dims=24,48,72,96"], ids=["atto", "custom"])
def test_our_file_loads_strictly_and_its_logits_match(tmp_path, mm, variant):
    _, checkpoint = mm
    src = _original_fixture(tmp_path / "src.pt", num_classes=10, variant=variant)
    out = _to_mmpretrain(src, tmp_path / "ours.pth")
    arch = "atto" if variant == "atto" else CUSTOM_ARCH
    model = _classifier(mm, arch, 10)
    checkpoint.load_checkpoint(model, str(out), map_location="cpu", strict=True)
    images = parity_rule.seeded_images(2, IMAGE_SIZE, parity_rule.DEFAULT_SEED)
    theirs = _float64(model.eval(), images, mode="tensor").numpy()
    ours = parity_rule.referee_features(converters.load(src), images)["logits"]
    _assert_float64_close(ours, theirs, f"logits of our file ({variant})")
    # strict=True is strict: the same file without one tensor is refused by mmengine.
    stored = read_torch_zip(out)
    del stored["state_dict"]["head.fc.bias"]
    write_torch_zip(tmp_path / "short.pth", stored)
    with pytest.raises(RuntimeError, match="head.fc.bias"):
        checkpoint.load_checkpoint(_classifier(mm, arch, 10), str(tmp_path / "short.pth"), strict=True)


@mmpretrain_only
def test_data_preprocessor_values_are_mmpretrains_and_strict_loading_refuses_them(tmp_path, mm):
    models, checkpoint = mm
    preprocessor = models.build({"type": "ClsDataPreprocessor", "mean": [123.675, 116.28, 103.53],
                                 "std": [58.395, 57.12, 57.375], "to_rgb": True})
    buffers = collections.OrderedDict(("data_preprocessor." + k, v.numpy()) for k, v in
                                      (("mean", preprocessor.mean), ("std", preprocessor.std)))
    ours = _to_mmpretrain(_original_fixture(tmp_path / "src.pt"), tmp_path / "m.pth")
    path = tmp_path / "dp.pth"
    write_torch_zip(path, {"meta": {}, "state_dict": collections.OrderedDict([*buffers.items(),
                                                                              *_state_of(ours).items()])})
    ckpt = converters.load(path)
    assert (ckpt.preprocessing.mean, ckpt.preprocessing.std, ckpt.preprocessing.origin) == (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "read")
    # Why they are written back only where the source had them: the buffers are not persistent.
    with pytest.raises(RuntimeError, match="data_preprocessor.mean"):
        checkpoint.load_checkpoint(_classifier(mm, "atto", 10), str(path), strict=True)


def _detector_backbone(mm, seed: int):
    models, _ = mm
    backbone = models.build({"type": "ConvNeXt", "arch": "atto", "use_grn": True, "layer_scale_init_value": 0.,
                             "out_indices": (0, 1, 2, 3), "gap_before_final_norm": False})
    return _randomize(backbone, seed)


def _detector_state(backbone, dims: list[int]) -> collections.OrderedDict:
    """A Faster R-CNN's state dict around the backbone: FPN neck, RPN head, RoI box head (small widths)."""
    import torch

    generator = torch.Generator().manual_seed(5)
    state = collections.OrderedDict(("backbone." + k, v) for k, v in backbone.float().state_dict().items())
    shapes: dict[str, tuple[int, ...]] = {}
    for i, width in enumerate(dims):
        shapes |= {f"neck.lateral_convs.{i}.conv.weight": (32, width, 1, 1), f"neck.lateral_convs.{i}.conv.bias": (32,)}
    for i in range(len(dims)):
        shapes |= {f"neck.fpn_convs.{i}.conv.weight": (32, 32, 3, 3), f"neck.fpn_convs.{i}.conv.bias": (32,)}
    shapes |= {"rpn_head.rpn_conv.weight": (32, 32, 3, 3), "rpn_head.rpn_conv.bias": (32,),
               "rpn_head.rpn_cls.weight": (3, 32, 1, 1), "rpn_head.rpn_cls.bias": (3,),
               "rpn_head.rpn_reg.weight": (12, 32, 1, 1), "rpn_head.rpn_reg.bias": (12,),
               "roi_head.bbox_head.shared_fcs.0.weight": (64, 32 * 7 * 7), "roi_head.bbox_head.shared_fcs.0.bias": (64,),
               "roi_head.bbox_head.shared_fcs.1.weight": (64, 64), "roi_head.bbox_head.shared_fcs.1.bias": (64,),
               "roi_head.bbox_head.fc_cls.weight": (81, 64), "roi_head.bbox_head.fc_cls.bias": (81,),
               "roi_head.bbox_head.fc_reg.weight": (320, 64), "roi_head.bbox_head.fc_reg.bias": (320,)}
    for key, shape in shapes.items():
        state[key] = 0.02 * torch.randn(shape, generator=generator)
    return state


@mmpretrain_only
def test_detector_backbone_stage_features_match_mmpretrain_after_its_norms(tmp_path, mm):
    import torch
    import torch.nn.functional as F

    _, checkpoint = mm
    backbone = _detector_backbone(mm, seed=21)
    path = tmp_path / "faster_rcnn_convnextv2_atto_fpn.pth"
    meta = {"dataset_meta": {"classes": ["person", "bicycle", "car"]}, "epoch": 12}
    checkpoint.save_checkpoint({"meta": meta, "state_dict": _detector_state(backbone, ATTO_ARCH["channels"])},
                               str(path))
    ckpt = converters.load(path)
    assert ckpt.config.num_classes == 0 and not ckpt.config.head_norm
    assert ckpt.source.layout["prefix"] == "backbone."
    assert ckpt.source.layout["left_behind"] == {"neck.": 16, "roi_head.": 8, "rpn_head.": 6}
    assert mm_format.class_names(ckpt) is None  # a detector's classes are not this headless model's
    images = parity_rule.seeded_images(2, IMAGE_SIZE, parity_rule.DEFAULT_SEED)
    theirs = [t.numpy() for t in _float64(backbone, images)]
    features = parity_rule.referee_features(ckpt, images)
    for i in range(4):
        weight, bias = (torch.from_numpy(np.asarray(ckpt.tensors[f"extras.mmpretrain.norm{i}.{p}"], np.float64))
                        for p in ("weight", "bias"))
        stage = torch.from_numpy(features[f"stage{i + 1}"]).permute(0, 2, 3, 1)
        normed = F.layer_norm(stage, (stage.shape[-1],), weight, bias, eps=1e-6).permute(0, 3, 1, 2).numpy()
        _assert_float64_close(normed, theirs[i], f"stage {i} after backbone.norm{i}")
    # Written back, the backbone with its stage norms loads strictly into the same ConvNeXt.
    out = tmp_path / "backbone.pth"
    converters.save(ckpt, out, format="mmpretrain")
    fresh = _detector_backbone(mm, seed=0)
    checkpoint.load_checkpoint(fresh, str(out), strict=True, revise_keys=[(r"^backbone\.", "")])
    again = [t.numpy() for t in _float64(fresh, images)]
    for i in range(4):
        assert np.array_equal(again[i], theirs[i]), f"stage {i}"


@mmpretrain_only
def test_an_mmengine_training_checkpoint_reads_its_weights_only(tmp_path, mm):
    import torch
    from mmengine.logging import MessageHub

    _, checkpoint = mm
    model = _randomize(_classifier(mm, "atto", 4), seed=3)
    hub = MessageHub.get_instance("convnextv2-test")
    hub.update_scalar("train/loss", 1.25)
    hub.update_scalar("train/lr", 4e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 3, 32, 32), mode="tensor").sum().backward()
    optimizer.step()
    path = tmp_path / "epoch_3.pth"
    checkpoint.save_checkpoint({"meta": {"epoch": 3}, "state_dict": model.state_dict(),
                                "message_hub": hub.state_dict(), "optimizer": optimizer.state_dict()}, str(path))
    ckpt = converters.load(path)
    assert ckpt.config.num_classes == 4
    assert ckpt.info["skipped"]["message_hub"].get("mmengine.logging.history_buffer.HistoryBuffer") == 2
    assert "optimizer" in ckpt.info["skipped"]
    clean = _to_mmpretrain(path, tmp_path / "clean.pth")
    _same_tensors({k: v.detach().numpy() for k, v in model.state_dict().items()}, _state_of(clean))
    assert list(read_torch_zip(clean)) == ["meta", "state_dict"] and "skipped" not in converters.load(clean).info


@mmpretrain_only
def test_mmpretrains_convnext_v1_is_refused(tmp_path, mm):
    models, checkpoint = mm
    v1 = models.build({"type": "ImageClassifier", "backbone": {"type": "ConvNeXt", "arch": "atto"},
                       "head": {"type": "LinearClsHead", "num_classes": 4, "in_channels": 320}})
    path = tmp_path / "convnext_v1.pth"
    checkpoint.save_checkpoint({"meta": {}, "state_dict": v1.state_dict()}, str(path))
    with pytest.raises(BadInputError) as info:
        converters.load(path)
    # mmpretrain's V1 block keeps its layer scale as "gamma" beside depthwise_conv; the key is quoted as the file
    # names it, under backbone.
    assert str(info.value) == (f"{path}: this is a ConvNeXt V1 checkpoint (mmpretrain naming: per-block layer "
                               "scale 'backbone.stages.0.0.gamma', no GRN); this toolkit reads ConvNeXt V2 only")


# ------------------------------------------------------------ the training run's config (meta["cfg"])

def _with_run_config(src: Path, dest: Path, config_text: str) -> Path:
    obj = read_torch_zip(src)
    state = collections.OrderedDict((k, np.array(v)) for k, v in obj["state_dict"].items())
    meta = {key: value for key, value in obj["meta"].items() if key != mm_format.TOOLKIT_META}
    write_torch_zip(dest, {"meta": {**meta, "cfg": config_text}, "state_dict": state}, archive_name=dest.stem)
    return dest


@mmpretrain_only
@pytest.mark.parametrize(("config", "expected"), [
    ("convnext-v2-atto_32xb32_in1k.py", dict(input_size=224, crop_pct=224 / 256, crop_mode="center")),
    ("convnext-v2-base_32xb32_in1k-384px.py", dict(input_size=384, crop_pct=1.0, crop_mode="squash")),
])
def test_the_runs_config_states_the_preprocessing(tmp_path, mm, config, expected):
    """mmengine's Runner stores the config's pretty_text in meta["cfg"]: mmpretrain's own ConvNeXt V2 configs,
    printed by mmengine, give their test pipeline and normaliser; nothing in the text is run."""
    import mmpretrain
    from mmengine.config import Config

    configs = Path(mmpretrain.__file__).parent / ".mim" / "configs" / "convnext_v2"
    text = Config.fromfile(str(configs / config)).pretty_text
    src = _to_mmpretrain(_original_fixture(tmp_path / "atto.pt"), tmp_path / "atto.pth")
    ckpt = converters.load(_with_run_config(src, tmp_path / "epoch_300.pth", text))
    pre = ckpt.preprocessing
    assert pre.origin == "read"
    assert (pre.input_size, pre.crop_pct, pre.crop_mode, pre.interpolation) == (
        expected["input_size"], pytest.approx(expected["crop_pct"]), expected["crop_mode"], "bicubic")
    assert pre.mean == pytest.approx((123.675 / 255, 116.28 / 255, 103.53 / 255))
    assert pre.std == pytest.approx((58.395 / 255, 57.12 / 255, 57.375 / 255))


def test_a_config_is_parsed_never_run(tmp_path):
    marker = tmp_path / "ran"
    text = (f"import os\nos.system('touch {marker}')\n"
            f"data_preprocessor = dict(mean=[1.0, 2.0, __import__('os').system('touch {marker}')], std=[1, 1, 1])\n"
            "test_pipeline = [dict(type='ResizeEdge', scale=320, edge='short', interpolation='bilinear'), "
            "dict(type='CenterCrop', crop_size=288)]\n")
    src = _to_mmpretrain(_original_fixture(tmp_path / "atto.pt"), tmp_path / "atto.pth")
    ckpt = converters.load(_with_run_config(src, tmp_path / "run.pth", text))
    assert not marker.exists()
    pre = ckpt.preprocessing
    # The normaliser's expression is not a literal: left out, as if unstated; the pipeline is taken.
    assert (pre.input_size, pre.crop_pct, pre.interpolation) == (288, pytest.approx(0.9), "bilinear")
    assert pre.mean == converters.Preprocessing().mean


def test_a_bgr_run_is_said_and_its_normaliser_not_taken(tmp_path):
    text = "data_preprocessor = dict(mean=[103.53, 116.28, 123.675], std=[57.375, 57.12, 58.395], to_rgb=False)\n"
    src = _to_mmpretrain(_original_fixture(tmp_path / "atto.pt"), tmp_path / "atto.pth")
    with pytest.warns(UserWarning, match=r"feeds the model BGR images \(data_preprocessor to_rgb=False\)"):
        ckpt = converters.load(_with_run_config(src, tmp_path / "bgr.pth", text))
    assert ckpt.preprocessing.mean == converters.Preprocessing().mean
