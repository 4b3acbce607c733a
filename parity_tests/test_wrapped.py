"""A ConvNeXt V2 inside a bigger model's state dict (converters/wrapped.py): found under any prefix by its
naming's anchor key, read exactly, and everything else counted by group, never dropped silently.

The DDP file is written by torch's own DistributedDataParallel around timm's model; the detector and
distillation layouts wrap the toolkit's original-layout fixture under the prefixes those tools use.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convnextv2 import converters, fixtures
from convnextv2.converters.cli import main
from convnextv2.converters.original import canonical_to_state_dict
from convnextv2.converters.torchzip import write_torch_zip
from convnextv2.converters.wrapped import candidate_prefixes, unwrap
from convnextv2.reference.errors import BadInputError


@pytest.fixture(scope="module")
def atto():
    return fixtures.make_checkpoint("atto", seed=3, fmt="original", num_classes=10)


def _original_state(ckpt) -> collections.OrderedDict[str, np.ndarray]:
    return canonical_to_state_dict(ckpt, "finetuned")


def _write(path: Path, obj) -> Path:
    write_torch_zip(path, obj, archive_name=path.stem)
    return path


def _same_tensors(a, b) -> None:
    assert set(a.tensors) == set(b.tensors)
    for name, array in a.tensors.items():
        assert np.array_equal(array, b.tensors[name]), name


@pytest.mark.parametrize("prefix", ["module.", "model.", "encoder.", "module.backbone.", "student.model."])
def test_a_wrapped_original_state_dict_reads_exactly(tmp_path, atto, prefix):
    state = _original_state(atto)
    wrapped = collections.OrderedDict((prefix + k, v) for k, v in state.items())
    path = _write(tmp_path / "wrapped.pt", {"model": wrapped})
    ckpt = converters.load(path)
    _same_tensors(ckpt, atto)
    assert ckpt.source.layout["prefix"] == prefix
    assert "left_behind" not in ckpt.source.layout


def test_what_is_left_behind_is_counted_by_group(tmp_path, atto):
    state = {"backbone." + k: v for k, v in _original_state(atto).items()}
    rng = np.random.default_rng(0)
    others = {"neck.lateral_convs.0.conv.weight": (8, 40, 1, 1), "neck.lateral_convs.1.conv.weight": (8, 80, 1, 1),
              "rpn_head.rpn_conv.weight": (8, 8, 3, 3), "rpn_head.rpn_cls.weight": (3, 8, 1, 1),
              "roi_head.bbox_head.fc_cls.weight": (81, 64), "logit_scale": ()}
    for key, shape in others.items():
        state[key] = rng.standard_normal(shape).astype(np.float32)
    path = _write(tmp_path / "detector.pth", {"meta": {"epoch": 12}, "state_dict": state})
    ckpt = converters.load(path)
    _same_tensors(ckpt, atto)
    assert ckpt.source.layout["prefix"] == "backbone."
    assert ckpt.source.layout["left_behind"] == {"logit_scale": 1, "neck.": 2, "roi_head.": 1, "rpn_head.": 2}
    assert ckpt.info["skipped"] == {"meta": {}}


def test_several_models_need_a_prefix_and_the_prefix_chooses(tmp_path, atto):
    other = fixtures.make_checkpoint("atto", seed=4, fmt="original", num_classes=10)
    state = {**{"teacher." + k: v for k, v in _original_state(other).items()},
             **{"student." + k: v for k, v in _original_state(atto).items()}}
    path = _write(tmp_path / "distill.pt", {"model": state})
    with pytest.raises(BadInputError) as info:
        converters.load(path)
    assert str(info.value) == (f"{path}: 2 ConvNeXt V2 models in the file, under 'student.', 'teacher.'; "
                               "choose one with --prefix")
    _same_tensors(converters.load(path, prefix="student."), atto)
    teacher = converters.load(path, prefix="teacher")  # the trailing dot is optional
    _same_tensors(teacher, other)
    assert teacher.source.layout["left_behind"] == {"student.": len(state) // 2}
    with pytest.raises(BadInputError, match=r"--prefix 'pupil\.' holds no original ConvNeXt V2 .* prefixes that "
                                            r"do: 'student\.', 'teacher\.'"):
        converters.load(path, prefix="pupil.")


def test_cli_prefix_and_refusal(tmp_path, atto):
    state = {**{"a." + k: v for k, v in _original_state(atto).items()},
             **{"b." + k: v for k, v in _original_state(atto).items()}}
    path = _write(tmp_path / "two.pt", {"model": state})
    runner = CliRunner()
    out = tmp_path / "out.safetensors"
    refused = runner.invoke(main, ["convert", str(path), "-o", str(out), "--to", "canonical"])
    assert refused.exit_code == 2, refused.output
    assert "choose one with --prefix" in refused.output and "Traceback" not in refused.output
    assert not out.exists()
    done = runner.invoke(main, ["convert", str(path), "-o", str(out), "--to", "canonical", "--prefix", "b."])
    assert done.exit_code == 0, done.output
    _same_tensors(converters.load(out), atto)


def test_the_sparse_pretraining_layout_is_not_a_wrapper(tmp_path):
    """fcmae-sparse keeps its encoder under "encoder." itself, next to a decoder: not a wrapper to strip."""
    path = tmp_path / "sparse.pt"
    fixtures.write_fixture(path, "atto", "fcmae-sparse", seed=1)
    ckpt = converters.load(path)
    assert ckpt.source.layout["layout"] == "fcmae-sparse"
    assert "prefix" not in ckpt.source.layout
    assert any(name.startswith("extras.fcmae.") for name in ckpt.tensors)


def test_candidate_prefixes_need_a_whole_component():
    keys = ["xstages.0.0.dwconv.weight", "a.stages.0.0.dwconv.weight", "stages.0.0.dwconv.weight"]
    assert candidate_prefixes(keys, ("stages.0.0.dwconv.weight",)) == ["", "a."]


def test_keep_outside_takes_a_sibling_of_the_wrapper():
    state = {"module.backbone.stages.0.0.dwconv.weight": np.zeros(1), "module.head.fc.weight": np.zeros(2),
             "module.neck.x": np.zeros(3)}
    found = unwrap(state, ("stages.0.0.dwconv.weight",), "f", "original", keep_outside=("head.",))
    assert sorted(found.state) == ["head.fc.weight", "stages.0.0.dwconv.weight"]
    assert found.left_behind == {"module.neck.": 1}


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from convnextv2.converters.runners.peers import import_timm
    timm = import_timm()
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(timm.create_model("convnextv2_atto", num_classes=7))
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, sys.argv[1])
    torch.save(model.module.state_dict(), sys.argv[1] + ".plain")
    dist.destroy_process_group()
""")


def test_a_ddp_checkpoint_written_by_torch_reads_as_timm(tmp_path):
    path = tmp_path / "ddp.pth"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", DDP_SCRIPT, str(path), str(tmp_path / "rendezvous")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    wrapped = converters.load(path)
    plain = converters.load(Path(str(path) + ".plain"))
    assert wrapped.source.format == "timm" and wrapped.source.layout["prefix"] == "module."
    assert wrapped.info["skipped"] == {"epoch": {}}
    _same_tensors(wrapped, plain)


def test_what_is_left_out_is_said_at_conversion_once(tmp_path, atto):
    state = {"backbone." + k: v for k, v in _original_state(atto).items()}
    state["neck.fpn.weight"] = np.ones((4, 4), np.float32)
    path = _write(tmp_path / "det.pth", {"state_dict": state, "optimizer": {"state": {}, "param_groups": []}})
    runner = CliRunner()
    first = tmp_path / "first.safetensors"
    done = runner.invoke(main, ["convert", str(path), "-o", str(first), "--to", "canonical", "--json"])
    assert done.exit_code == 0, done.output
    notes = ["read the ConvNeXt V2 under 'backbone.'; left behind 1 tensor(s) of the wider model: neck.* (1)",
             "skipped beside the weights: optimizer"]
    assert [f"note: {n}" for n in notes] == [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert json.loads(done.stdout)["notes"] == notes
    # The canonical output records its source, but reading it leaves nothing out.
    again = runner.invoke(main, ["convert", str(first), "-o", str(tmp_path / "second.safetensors"), "--to", "canonical"])
    assert again.exit_code == 0 and "note:" not in again.stderr
