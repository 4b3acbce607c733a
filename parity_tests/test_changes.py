"""A conversion never changes a checkpoint without saying so: what the target cannot carry is announced with
its size (the float64 logits difference), listed in the JSON summary, and refused under --strict."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convnextv2 import converters
from convnextv2.converters.cli import main
from convnextv2.fixtures import write_fixture
from convnextv2.reference import parity_rule as rule
from convnextv2.reference import schema

SMALL = "custom:depths=1,1,2,1;dims=16,32,48,64"


def _hf_folder(tmp_path: Path, *, num_labels: int | None, name: str = "hf") -> Path:
    """A folder written by transformers' own save_pretrained from a config with the Hub's eps (1e-12), with
    norms perturbed away from identity so that the eps matters."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("torch")
    from convnextv2.converters.runners.peers import import_transformers

    try:
        transformers = import_transformers()
    except ImportError as exc:
        pytest.skip(f"transformers is not installed: {exc}")
    import torch

    torch.manual_seed(0)
    config = transformers.ConvNextV2Config(depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 48, 64], layer_norm_eps=1e-12,
                                           **({"num_labels": num_labels} if num_labels else {}))
    cls = transformers.ConvNextV2ForImageClassification if num_labels else transformers.ConvNextV2Model
    model = cls(config).eval()
    with torch.no_grad():
        for key, value in model.named_parameters():
            if "norm" in key or "grn" in key:
                value.add_(0.3 * torch.randn_like(value))
    folder = tmp_path / name
    model.save_pretrained(str(folder))
    return folder


def _transformers_eps_difference(folder: Path, headless: bool) -> float:
    """The same move measured independently: transformers itself in float64, at eps 1e-12 and at 1e-6."""
    import torch

    from convnextv2.converters.runners.peers import import_transformers

    transformers = import_transformers()
    cls = transformers.ConvNextV2Model if headless else transformers.ConvNextV2ForImageClassification
    images = torch.from_numpy(rule.seeded_images(4, 224).astype(np.float64))
    outs = []
    for eps in (1e-12, 1e-6):
        model = cls.from_pretrained(str(folder), layer_norm_eps=eps, dtype=torch.float64).eval()
        with torch.no_grad():
            out = model(pixel_values=images)
        outs.append((out.pooler_output if headless else out.logits).numpy())
    return float(np.max(np.abs(outs[0] - outs[1])))


# timm's ConvNeXt has one norm_eps for all its LayerNorms, so it cannot hold a final norm with its own eps either.
@pytest.mark.parametrize("target", ["original-finetuned", "original-fcmae", "timm"])
def test_hub_eps_into_a_format_without_a_place_warns_with_the_move_and_strict_refuses(tmp_path, target):
    fmt, _, layout = target.partition("-")
    headless = layout == "fcmae"
    folder = _hf_folder(tmp_path, num_labels=None if headless else 10)
    suffix = ".pt" if fmt == "original" else ".safetensors"
    out = tmp_path / f"out{suffix}"
    options = ["--layout", layout] if layout else []
    result = CliRunner().invoke(main, ["convert", str(folder), "--to", fmt, *options, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert "final LayerNorm eps 1e-12 -> 1e-06" in result.stderr
    summary = json.loads(result.stdout)
    (change,) = summary["changes"]
    assert change["field"] == "head_norm_eps" and change["before"] == 1e-12 and change["after"] == 1e-6
    figure = change["logits_difference"]
    expected = _transformers_eps_difference(folder, headless)
    assert expected > 1e-7  # the move is real, not rounding
    assert figure["max_abs"] == pytest.approx(expected, rel=1e-6)
    assert f"{figure['max_abs']:.3g}" in result.stderr
    assert converters.load(out).config.head_norm_eps == 1e-6  # the file records the function it computes
    written = sorted(p.name for p in tmp_path.iterdir())

    strict_out = tmp_path / f"strict{suffix}"
    result = CliRunner().invoke(main, ["convert", str(folder), "--to", fmt, *options, "-o", str(strict_out),
                                       "--strict"])
    assert result.exit_code == 1, result.output
    assert "--strict" in result.stderr and "eps 1e-12 -> 1e-06" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == written, "a refused conversion wrote something"


def test_hub_eps_has_no_place_in_the_sparse_layout_and_is_refused_by_name(tmp_path):
    folder = _hf_folder(tmp_path, num_labels=None)
    result = CliRunner().invoke(main, ["convert", str(folder), "--to", "original", "--layout", "fcmae-sparse",
                                       "-o", str(tmp_path / "s.pt")])
    assert result.exit_code == 2 and "head.norm.weight has no place in the fcmae-sparse layout" in result.output


def test_formats_that_carry_the_eps_report_no_change(tmp_path):
    folder = _hf_folder(tmp_path, num_labels=10)
    ckpt = converters.load(folder)
    for fmt, name in (("canonical", "c.safetensors"), ("hf", "h"), ("flax", "f.safetensors")):
        summary = converters.save(ckpt, tmp_path / name, format=fmt, warn=pytest.fail)
        assert summary["changes"] == [] and summary["read_back"]["status"] == "exact"
        assert converters.load(tmp_path / name).config.head_norm_eps == 1e-12


def test_extras_into_a_format_without_a_place_are_listed(tmp_path):
    src = tmp_path / "sparse.pt"
    write_fixture(src, variant=SMALL, fmt="fcmae-sparse")
    ckpt = converters.load(src)
    extras = sorted(ckpt.extras())
    assert extras, "the FCMAE fixture carries its decoder as extras"
    said: list[str] = []
    summary = converters.save(ckpt, tmp_path / "h", format="hf", warn=said.append)
    (change,) = summary["changes"]
    assert change["field"] == "extras" and change["before"] == extras and not change["functional"]
    assert said and f"{len(extras)} extras tensor(s) not written" in said[0]
    assert converters.load(tmp_path / "h").extras() == {}
    with pytest.raises(converters.CheckFailedError, match="extras"):
        converters.save(ckpt, tmp_path / "h2", format="hf", strict=True, warn=said.append)
    assert not (tmp_path / "h2").exists()
    # A format with a place for them keeps them, bit for bit (the read-back check compares them).
    assert converters.save(ckpt, tmp_path / "k.safetensors", format="canonical", warn=pytest.fail)["changes"] == []


def test_preprocessing_an_original_file_cannot_state_is_listed_unless_its_name_carries_it(tmp_path):
    src = tmp_path / "c.safetensors"
    write_fixture(src, variant=SMALL, fmt="canonical")
    ckpt = converters.load(src)
    ckpt.preprocessing = dataclasses.replace(ckpt.preprocessing, input_size=384, crop_pct=1.0,
                                             crop_mode="squash").with_origin("set")
    said: list[str] = []
    summary = converters.save(ckpt, tmp_path / "model.pt", format="original", warn=said.append)
    (change,) = summary["changes"]
    assert change["field"] == "preprocessing" and "input_size 384 -> 224" in change["message"]
    assert converters.load(tmp_path / "model.pt").preprocessing.input_size == 224
    # The original reader reads a resolution from the file name: then nothing is lost.
    assert converters.save(ckpt, tmp_path / "model_384.pt", format="original", warn=pytest.fail)["changes"] == []
    assert converters.load(tmp_path / "model_384.pt").preprocessing == ckpt.preprocessing


def test_save_and_a_direct_write_agree_on_what_a_format_cannot_hold(tmp_path):
    """What a format cannot hold is declared once (its record's ``unrepresentable``): save announces each declared
    change, exactly once, and the writer itself, called directly, says nothing of it (it only writes)."""
    import warnings

    from convnextv2.converters import timm

    src = tmp_path / "fcmae.pt"
    write_fixture(src, SMALL, "fcmae", seed=1)
    ckpt = converters.load(src)
    # A transformers eps on the final norm, and a decoder tensor among the extras: neither has a place in timm.
    ckpt = dataclasses.replace(ckpt, config=ckpt.config.with_(head_norm=True, head_norm_eps=1e-12),
                               tensors={**ckpt.tensors, "head.norm.weight": np.ones(64, np.float32),
                                        "head.norm.bias": np.zeros(64, np.float32),
                                        f"{schema.EXTRAS_PREFIX}decoder.mask_token": np.zeros(8, np.float32)})
    declared = [c.message for c in timm.FORMAT.unrepresentable(ckpt, tmp_path / "a.safetensors", {})]
    assert len(declared) == 2 and "eps 1e-12 -> 1e-06" in declared[0] and "extras" in declared[1], declared
    with warnings.catch_warnings(record=True) as direct:
        warnings.simplefilter("always")
        timm.write(ckpt, tmp_path / "direct.safetensors")
    assert not [w for w in direct if "extras" in str(w.message) or "eps" in str(w.message)], \
        [str(w.message) for w in direct]
    said: list[str] = []
    converters.save(ckpt, tmp_path / "saved.safetensors", format="timm", warn=said.append)
    assert [m.split(": ", 1)[1].split("; float64")[0] for m in said] == declared
