"""Every conversion proves itself: the output read back bit for bit, ONNX imports run in onnxruntime, --verify
runs source and output by their own runtimes; preprocessing and a file's identity are shown for what they are."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convnextv2 import converters
from convnextv2.converters import canonical
from convnextv2.converters.cli import main
from convnextv2.converters.onnx.session import ort_session
from convnextv2.converters.runners import gates
from convnextv2.fixtures import write_fixture
from convnextv2.reference import parity_rule as rule

SMALL = "custom:depths=1,1,2,1;dims=16,32,48,64"


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.pt"
    write_fixture(path, variant=SMALL, fmt="original", num_classes=10)
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ read-back

def test_every_conversion_reads_its_output_back_bit_for_bit(tmp_path, small):
    ckpt = converters.load(small)
    summary = converters.save(ckpt, tmp_path / "c.safetensors", format="canonical")
    back = summary["read_back"]
    assert back["status"] == "exact" and back["tensors"] == len(ckpt.ordered_tensors())
    assert back["bytes"] == sum(v.nbytes for _, v in ckpt.ordered_tensors())
    result = _cli("convert", small, "--to", "hf", "-o", tmp_path / "h", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["read_back"]["tensors"] == back["tensors"]


def test_a_writer_that_writes_other_values_is_caught_and_nothing_is_published(tmp_path, small, monkeypatch):
    honest = canonical.write

    def bit_flipping_write(ckpt, path):
        tensors = dict(ckpt.tensors)
        flipped = np.array(tensors["stem.conv.weight"])
        flipped.view(np.uint32).flat[7] ^= 1  # one ulp in one weight
        tensors["stem.conv.weight"] = flipped
        honest(dataclasses.replace(ckpt, tensors=tensors), path)

    # The writer save calls is the one in the format's record (write_as, when it has one, knows the name).
    monkeypatch.setattr(canonical, "FORMAT", dataclasses.replace(canonical.FORMAT, write=bit_flipping_write,
                                                                 write_as=None))
    ckpt = converters.load(small)
    with pytest.raises(converters.CheckFailedError, match=r"stem\.conv\.weight: 1 element\(s\) differ"):
        converters.save(ckpt, tmp_path / "c.safetensors", format="canonical")
    assert _listing(tmp_path) == ["small.pt"]
    # With --overwrite the file already there is kept, since the bad one is never published.
    (tmp_path / "c.safetensors").write_bytes(b"old")
    result = _cli("convert", small, "--to", "canonical", "-o", tmp_path / "c.safetensors", "--overwrite")
    assert result.exit_code == 1 and "reading the output back does not give what was written" in result.stderr
    assert (tmp_path / "c.safetensors").read_bytes() == b"old"
    assert _listing(tmp_path) == ["c.safetensors", "small.pt"]


# ------------------------------------------------------------------ ONNX import

def _onnx_graphs(tmp_path: Path) -> tuple[Path, Path]:
    """Our exporter's graph, and a copy edited with onnx.helper so that the first block's branch comes back
    from channels-last with H and W swapped (perm 0,3,2,1 instead of 0,3,1,2) before the residual add: on square
    images it runs, with the same tensors and another function."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    honest = tmp_path / "honest.onnx"
    write_fixture(honest, variant=SMALL, fmt="onnx", num_classes=10)
    model = onnx.load(str(honest))
    back = [n for n in model.graph.node if n.op_type == "Transpose"
            and list(onnx.helper.get_attribute_value(n.attribute[0])) == [0, 3, 1, 2]]
    block_end = back[1]  # back[0] ends the stem's LayerNorm; back[1] the first block's branch
    del block_end.attribute[:]
    block_end.attribute.append(onnx.helper.make_attribute("perm", [0, 3, 2, 1]))
    doctored = tmp_path / "doctored.onnx"
    onnx.save(model, str(doctored))
    return honest, doctored


def test_onnx_import_runs_the_graph_and_refuses_one_whose_function_differs_from_its_tensors(tmp_path):
    honest, doctored = _onnx_graphs(tmp_path)
    # The reader sees the same tensors in both; onnxruntime itself says the functions differ.
    a, b = converters.load(honest), converters.load(doctored)
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.model_tensors())
    images = rule.seeded_images(2, 224)
    run = {p: ort_session(p, optimise=False).run(None, {"pixel_values": images})[0] for p in (honest, doctored)}
    assert np.max(np.abs(run[honest] - run[doctored])) > 1e-4  # far beyond float32 rounding (~1e-7 here)

    result = _cli("convert", doctored, "--to", "canonical", "-o", tmp_path / "d.safetensors")
    assert result.exit_code == 1, result.output
    assert "the graph's function differs from the PyTorch reference" in result.stderr
    assert "nothing written" in result.stderr and not (tmp_path / "d.safetensors").exists()

    result = _cli("convert", honest, "--to", "canonical", "-o", tmp_path / "h.safetensors", "--json")
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["onnx_import"]
    assert check["passed"] and "optimisations off" in check["runner"] and check["max_abs"] <= check["tolerance"]


# ------------------------------------------------------------------ --verify

def test_verify_runs_a_transformers_folder_by_transformers_and_the_output_by_its_runtime(tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from convnextv2.converters.runners.peers import import_transformers

    try:
        transformers = import_transformers()
    except ImportError as exc:
        pytest.skip(f"transformers is not installed: {exc}")
    import torch

    torch.manual_seed(0)
    config = transformers.ConvNextV2Config(depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 48, 64], num_labels=10,
                                           layer_norm_eps=1e-12)
    transformers.ConvNextV2ForImageClassification(config).save_pretrained(str(tmp_path / "hf"))
    result = _cli("convert", tmp_path / "hf", "--to", "canonical", "-o", tmp_path / "c.safetensors", "--verify",
                  "--json")
    assert result.exit_code == 0, result.output
    checked = json.loads(result.stdout)["verify"]
    assert checked["passed"] and checked["images"] == [gates.VERIFY_BATCH, 3, 224, 224]
    assert checked["source"]["runner"].startswith("transformers") and checked["output"]["runner"] == "PyTorch reference"
    for side in ("source", "output"):
        assert 0 < checked[side]["max_abs"] <= checked[side]["tolerance"]
    # timm's model uses eps 1e-6 in its final LayerNorm whatever the file records: run by timm, the output
    # computes another function than transformers' eps 1e-12, and --verify refuses to publish it.
    result = _cli("convert", tmp_path / "hf", "--to", "timm", "-o", tmp_path / "t.safetensors", "--verify")
    assert result.exit_code == 1 and "--verify: output (timm)" in result.stderr, result.output
    assert _listing(tmp_path) == ["c.safetensors", "hf"]


def test_verify_failing_writes_nothing(tmp_path, small, monkeypatch):
    from convnextv2.converters.runners import references

    honest = references.ReferenceRunner.infer

    def off_by_a_little(self, images, precision):  # the canonical output only, not the source
        shift = 1e-3 if self.file is not None and self.file.format == "canonical" else 0.0
        return {k: v + shift for k, v in honest(self, images, precision).items()}

    monkeypatch.setattr(references.ReferenceRunner, "infer", off_by_a_little)
    result = _cli("convert", small, "--to", "canonical", "-o", tmp_path / "c.safetensors", "--verify")
    assert result.exit_code == 1 and "--verify: output (PyTorch reference)" in result.stderr
    assert _listing(tmp_path) == ["small.pt"]


# ------------------------------------------------------------------ preprocessing and identity

def test_preprocessing_set_at_a_conversion_is_validated_recorded_and_shown(tmp_path, small):
    result = _cli("inspect", small, "--json")
    assert json.loads(result.stdout)["preprocessing"]["origin"] == "assumed"  # a .pt states none
    out = tmp_path / "c.safetensors"
    result = _cli("convert", small, "--to", "canonical", "-o", out, "--input-size", "384", "--crop-pct", "1",
                  "--crop-mode", "squash", "--interpolation", "bilinear", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5")
    assert result.exit_code == 0, result.output
    pre = converters.load(out).preprocessing
    assert (pre.input_size, pre.crop_pct, pre.crop_mode, pre.interpolation, pre.mean, pre.std, pre.origin) == (
        384, 1.0, "squash", "bilinear", (0.5,) * 3, (0.5,) * 3, "set")
    assert "[set at a conversion]" in _cli("inspect", out).stdout
    for bad in (["--input-size", "100"], ["--crop-pct", "0"], ["--mean", "1,2"], ["--std", "1,0,1"],
                ["--crop-mode", "border"]):
        result = _cli("convert", small, "--to", "canonical", "-o", tmp_path / "bad.safetensors", *bad)
        assert result.exit_code == 2, (bad, result.output)
    assert not (tmp_path / "bad.safetensors").exists()


def test_inspect_and_the_parity_header_show_the_file_itself_apart_from_its_source(tmp_path, small):
    out = tmp_path / "c.safetensors"
    assert _cli("convert", small, "--to", "canonical", "-o", out).exit_code == 0
    own, origin = hashlib.sha256(out.read_bytes()).hexdigest(), hashlib.sha256(small.read_bytes()).hexdigest()
    data = json.loads(_cli("inspect", out, "--json").stdout)
    assert (data["format"], data["sha256"], data["file"]["file_name"]) == ("canonical", own, out.name)
    assert (data["source"]["format"], data["source"]["sha256"], data["source"]["file_name"]) == (
        "original", origin, small.name)
    text = _cli("inspect", out).stdout
    assert f"sha256       {own}" in text and f"source       original {small.name} sha256 {origin}" in text

    folder = tmp_path / "h"
    assert _cli("convert", out, "--to", "hf", "-o", folder).exit_code == 0
    concatenated = b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())
    assert json.loads(_cli("inspect", folder, "--json").stdout)["sha256"] == hashlib.sha256(concatenated).hexdigest()

    report = tmp_path / "r.json"
    result = _cli("parity", out, "--runtimes", "torch", "--image-size", "64", "--batch", "1", "--report", report)
    assert result.exit_code == 0, result.output
    header = json.loads(report.read_text())["checkpoint"]
    assert (header["format"], header["sha256"], header["file_name"]) == ("canonical", own, out.name)
    assert header["source"] == {"format": "original", "file_name": small.name, "sha256": origin}
