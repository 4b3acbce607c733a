"""Families told apart (converters/families.py), with files the real libraries write.

ConvNeXt V1 (a layer scale in every block, no GRN) in timm's naming comes from timm's own V1 models; in the
facebookresearch naming, from those models' state dicts renamed here, the names proven by timm's own converter
of facebookresearch files (``checkpoint_filter_fn``) turning them back into timm's model exactly; in transformers'
naming, from ``ConvNextForImageClassification`` / ``ConvNextModel`` folders written by ``save_pretrained``. A file
of another model is timm's ResNet-18. Each goes through the command line in-process, ``inspect`` and
``convert``: exit 2, one line naming the file, no traceback, nothing written.

``inspect`` shows the family, the naming, the wrapper and what was skipped: for timm's ConvNeXt V2 under
``module.`` (written by torch's ``DataParallel``) inside a training checkpoint, and under open_clip's
``visual.trunk.`` with the ``visual.head.proj.weight`` that timm's own converter takes as open_clip's layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from convnextv2.converters.cli import main
from convnextv2.converters.runners.peers import import_timm, import_transformers

V1_SUFFIX = "; this toolkit reads ConvNeXt V2 only"


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(path: Path, tmp_path: Path) -> str:
    """``inspect`` and ``convert`` both refuse ``path``: exit 2, one line, no traceback, nothing written.
    Returns the message (the same from both)."""
    messages = []
    out = tmp_path / "out.safetensors"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for args in (["inspect", path], ["convert", path, "--to", "canonical", "-o", out]):
        result = _cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), result.stderr
        assert "Traceback" not in result.output and result.stdout == ""
        messages.append(lines[0][len("error: "):])
    assert not out.exists() and sorted(p.name for p in tmp_path.rglob("*")) == before
    assert messages[0] == messages[1]
    return messages[0]


# ------------------------------------------------------------ ConvNeXt V1, timm and facebookresearch naming

@pytest.fixture(scope="module")
def timm_v1():
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False)  # timm's convnext_* are V1
    return timm, model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _facebookresearch_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's V1 names -> facebookresearch's (downsample_layers, stages.{s}.{b}, dwconv, pwconv, norm, head),
    MLP weights as the original's linears (timm's atto stores them as 1x1 convolutions)."""
    out = {}
    for key, value in state.items():
        new = re.sub(r"^stem\.", "downsample_layers.0.", key)
        new = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", new)
        new = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", new)
        new = new.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        new = {"head.norm.weight": "norm.weight", "head.norm.bias": "norm.bias",
               "head.fc.weight": "head.weight", "head.fc.bias": "head.bias"}.get(new, new)
        out[new] = value.flatten(1) if "pwconv" in new and value.ndim == 4 else value
    return out


def test_the_facebookresearch_names_are_the_ones_timm_converts(timm_v1):
    # The oracle for the renaming above: timm's converter of facebookresearch checkpoints gives back its model's
    # state dict exactly.
    timm, model, state = timm_v1
    from timm.models.convnext import checkpoint_filter_fn

    fb = _facebookresearch_names(state)
    assert "stages.0.0.gamma" in fb and "downsample_layers.0.0.weight" in fb and not any("grn" in k for k in fb)
    back = checkpoint_filter_fn({"model": fb}, model)
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("form", ["torch.save", "safetensors", "torch.save under module."])
def test_timm_v1_is_refused_as_v1(tmp_path, timm_v1, form):
    _, _, state = timm_v1
    path = tmp_path / ("v1.safetensors" if form == "safetensors" else "v1.pth")
    if form == "safetensors":
        safetensors.torch.save_file(state, path)
    elif form == "torch.save":
        torch.save(state, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    message = _refused(path, tmp_path)
    # The key quoted is the file's own name for it, wrapper prefix included: it can be found in the file.
    key = "module.stages.0.blocks.0.gamma" if form.endswith("module.") else "stages.0.blocks.0.gamma"
    assert message == (f"{path}: this is a ConvNeXt V1 checkpoint (timm naming: per-block layer scale "
                       f"'{key}', no GRN){V1_SUFFIX}")


@pytest.mark.parametrize("form", ["torch.save", "safetensors"])
def test_facebookresearch_v1_is_refused_as_v1(tmp_path, timm_v1, form):
    _, _, state = timm_v1
    fb = _facebookresearch_names(state)
    if form == "torch.save":
        path = tmp_path / "convnext_atto_1k_224.pth"
        torch.save({"model": fb}, path)  # the container facebookresearch's releases use
    else:
        # No format claims a safetensors file in this naming; it is still told apart by its keys.
        path = tmp_path / "convnext_atto.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in fb.items()}, path)
    message = _refused(path, tmp_path)
    assert message == (f"{path}: this is a ConvNeXt V1 checkpoint (original naming: per-block layer scale "
                       f"'stages.0.0.gamma', no GRN){V1_SUFFIX}")


def _mmpretrain_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's V1 names -> mmpretrain's classifier (``backbone.`` + depthwise_conv, pointwise_conv, norm3, and
    ``head.fc``). mmpretrain is not among this suite's libraries; at development these names and shapes were
    checked equal to mmpretrain 1.2's ``ConvNeXt(arch="atto", layer_scale_init_value=1e-6)`` plus LinearClsHead."""
    out = {}
    for key, value in _facebookresearch_names(state).items():
        new = key.replace("dwconv", "depthwise_conv").replace("pwconv", "pointwise_conv")
        new = {"norm.weight": "norm3.weight", "norm.bias": "norm3.bias", "head.weight": "head.fc.weight",
               "head.bias": "head.fc.bias"}.get(new, new)
        out[new if new.startswith("head.") else f"backbone.{new}"] = value
    return out


def test_mmpretrain_v1_is_refused_as_v1(tmp_path, timm_v1):
    from convnextv2.converters import formats

    _, _, state = timm_v1
    path = tmp_path / "convnext-v1_epoch_300.pth"
    torch.save({"meta": {"epoch": 300}, "state_dict": _mmpretrain_names(state)}, path)
    message = _refused(path, tmp_path)
    # The mmpretrain format names the naming where it is registered; without it no naming has this anchor.
    naming = "mmpretrain naming: " if "mmpretrain" in formats.available_formats() else ""
    assert re.fullmatch(rf"{re.escape(str(path))}: this is a ConvNeXt V1 checkpoint \({naming}per-block layer scale "
                        rf"'(backbone\.)?stages\.0\.0\.gamma', no GRN\){re.escape(V1_SUFFIX)}", message), message


# ------------------------------------------------------------ ConvNeXt V1, transformers

def _hf_v1(tmp_path: Path, classifier: bool, layer_scale: float) -> Path:
    transformers = import_transformers()
    config = transformers.ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], num_labels=5,
                                         layer_scale_init_value=layer_scale)
    cls = transformers.ConvNextForImageClassification if classifier else transformers.ConvNextModel
    torch.manual_seed(0)
    folder = tmp_path / "convnext-v1"
    cls(config).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "convnext"
    return folder


def test_transformers_v1_folder_is_refused_as_v1(tmp_path):
    folder = _hf_v1(tmp_path, classifier=True, layer_scale=1e-6)
    message = _refused(folder, tmp_path)
    assert message == (f"{folder}: this is a ConvNeXt V1 checkpoint (hf naming: per-block layer scale "
                       f"'convnext.encoder.stages.0.layers.0.layer_scale_parameter', no GRN){V1_SUFFIX}")
    # The weights file alone, without the config that says V1, is told apart by its keys the same way.
    weights = folder / "model.safetensors"
    assert _refused(weights, tmp_path) == message.replace(str(folder), str(weights), 1)


def test_transformers_v1_without_layer_scale_is_refused_as_v1(tmp_path):
    # layer_scale_init_value 0: no layer scale at all, so the missing GRN is what tells it apart.
    folder = _hf_v1(tmp_path, classifier=False, layer_scale=0.0)
    message = _refused(folder, tmp_path)
    assert message == (f"{folder}: this is a ConvNeXt V1 checkpoint (hf naming: no layer scale and no GRN in any "
                       f"block){V1_SUFFIX}")


# ------------------------------------------------------------ not ConvNeXt at all; V2 with stray keys

@pytest.fixture(scope="module")
def resnet():
    timm = import_timm()
    return {k: v.detach().clone() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}


def test_another_model_says_what_the_file_looks_like(tmp_path, resnet):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet, path)
    message = _refused(path, tmp_path)
    first = ", ".join(f"{k} {list(v.shape)}" for k, v in list(resnet.items())[:5])
    assert message.startswith(f"{path}: no ConvNeXt keys in any naming this toolkit reads (")
    assert message.endswith(f"); first keys: {first} (and {len(resnet) - 5} more)")
    for naming in ("original", "timm", "hf"):
        assert naming in message.split("(")[1]


def test_another_model_as_safetensors_is_described_too(tmp_path, resnet):
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(resnet, path)
    message = _refused(path, tmp_path)
    first = ", ".join(f"{k} {list(resnet[k].shape)}" for k in sorted(resnet)[:5])
    assert message.endswith(f"first keys: {first} (and {len(resnet) - 5} more)"), message


@pytest.fixture(scope="module")
def timm_v2():
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False)
    return timm, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_v2_with_a_few_stray_keys_keeps_the_readers_message(tmp_path, timm_v2):
    _, state = timm_v2
    stray = {"stages.1.blocks.0.mlp.extra.weight": torch.zeros(3, 2), "ema_decay": torch.zeros(())}
    path = tmp_path / "v2.pth"
    torch.save({**state, **stray}, path)
    message = _refused(path, tmp_path)
    assert message == (f"{path}: 2 key(s) not in timm's ConvNeXt V2 naming: "
                       f"stages.1.blocks.0.mlp.extra.weight [3, 2], ema_decay []")


def test_a_key_that_would_break_the_line_is_quoted(tmp_path, timm_v2):
    _, state = timm_v2
    path = tmp_path / "v2.pth"
    torch.save({**state, "evil\nerror: forged": torch.zeros(1)}, path)
    message = _refused(path, tmp_path)  # one line, checked there
    assert message.endswith("first unplaced: 'evil\\nerror: forged' [1]"), message


def test_v2_with_many_foreign_keys_gets_the_closest_naming(tmp_path, timm_v2):
    _, state = timm_v2
    extra = {f"aux.{i}.weight": torch.zeros(i + 1) for i in range(8)}
    path = tmp_path / "v2.safetensors"
    safetensors.torch.save_file({**state, **extra}, path)
    message = _refused(path, tmp_path)
    # The keys in the order the file's header lists them (safetensors sorts them by dtype, then name).
    size = int.from_bytes(path.read_bytes()[:8], "little")
    header = list(json.loads(path.read_bytes()[8: 8 + size]))
    unplaced = [k for k in header if k in extra]
    shown = ", ".join(f"{k} {list(extra[k].shape)}" for k in unplaced[:5])
    assert message == (f"{path}: not a ConvNeXt V2 checkpoint in any naming this toolkit reads; closest: timm "
                       f"({len(state)} of {len(state) + len(extra)} tensors placed); first unplaced: {shown} "
                       f"(and 3 more)")


# ------------------------------------------------------------ inspect: family, naming, wrapper, skipped

def _inspect(path: Path) -> tuple[dict, str]:
    result = _cli("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    text = _cli("inspect", path)
    assert text.exit_code == 0, text.output
    return json.loads(result.stdout), text.stdout


def test_inspect_shows_a_ddp_wrapper_and_what_training_left_beside_it(tmp_path, timm_v2):
    timm, _ = timm_v2
    model = timm.create_model("convnextv2_atto", pretrained=False)
    wrapped = torch.nn.DataParallel(model)  # what DDP and DataParallel save: the model under "module."
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": wrapped.state_dict(), "optimizer": optimizer.state_dict(),
                "meta": {"best_acc": np.float64(0.5)}}, path)
    data, text = _inspect(path)
    assert (data["family"], data["naming"], data["prefix"], data["left_behind"]) == (
        "ConvNeXt V2", "timm", "module.", {})
    assert set(data["skipped"]) == {"optimizer", "meta"}
    assert data["skipped"]["optimizer"] == {}
    [(scalar, count)] = data["skipped"]["meta"].items()
    assert scalar.startswith("numpy.") and scalar.endswith("multiarray.scalar") and count == 1
    assert "family       ConvNeXt V2\n" in text and "naming       timm\n" in text
    assert "wrapper      under 'module.'; nothing left behind\n" in text
    assert f"skipped      optimizer, meta ({scalar} x1)\n" in text


def test_inspect_shows_an_open_clip_tower_and_what_was_left_behind(tmp_path, timm_v2):
    timm, _ = timm_v2
    torch.manual_seed(1)
    trunk = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0)  # open_clip's TimmModel trunk
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state["visual.head.proj.weight"] = torch.randn(16, trunk.num_features)
    # The oracle for the layout: timm's own converter reads it as open_clip's, its projection as the classifier.
    from timm.models.convnext import checkpoint_filter_fn

    classifier = timm.create_model("convnextv2_atto", pretrained=False, num_classes=16)
    classifier.load_state_dict(checkpoint_filter_fn(state, classifier), strict=True)
    path = tmp_path / "open_clip_model.safetensors"
    safetensors.torch.save_file(state, path)
    data, text = _inspect(path)
    assert (data["family"], data["naming"], data["prefix"], data["left_behind"], data["skipped"]) == (
        "ConvNeXt V2", "timm", "visual.trunk.", {"visual.head.": 1}, {})
    assert data["num_classes"] == 0
    assert "wrapper      under 'visual.trunk.'; left behind 1 tensor(s): visual.head.* (1)\n" in text
    assert "skipped" not in text

    # Converted, the file is its own: no wrapper; its source record still names the one it came from.
    out = tmp_path / "c.safetensors"
    assert _cli("convert", path, "--to", "canonical", "-o", out).exit_code == 0
    data, text = _inspect(out)
    assert (data["family"], data["naming"], data["prefix"]) == ("ConvNeXt V2", None, "visual.trunk.")
    assert f"wrapper      under 'visual.trunk.'; left behind 1 tensor(s): visual.head.* (1) (in the source {path.name})" \
        in text and "naming" not in text
