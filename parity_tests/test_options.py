"""Reader and writer options: each format declares its own, and a misspelt one is refused by name.

``converters.load(path, emma=True)`` must not quietly read the non-EMA weights: ``load`` and ``save`` check
every option against the keyword-only parameters the format's ``read``/``write`` declares.
"""

from __future__ import annotations

import inspect

import pytest

from convnextv2 import converters, fixtures
from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.parity_tests.conftest_helpers import run_cli
from convnextv2.reference.errors import BadInputError, ConvNeXtV2Error

# What each format's reader and writer take, as documented in their modules (docs/*.md for the CLI flags).
READ_OPTIONS = {name: ["variant"] for name in converters.MODULES}
# prefix: where the model sits in a bigger model's state dict (converters/wrapped.py)
READ_OPTIONS["original"] = ["variant", "ema", "prefix"]
READ_OPTIONS["hf"] = ["variant", "revision"]  # huggingface_hub cache folders
READ_OPTIONS["timm"] = ["variant", "revision", "prefix"]
READ_OPTIONS["mmpretrain"] = ["variant", "prefix"]
# overwrite is converters.save's own (writers only write); the gated exports' image size is their own.
WRITE_OPTIONS = {name: [] for name in converters.MODULES}
WRITE_OPTIONS["timm"] = ["conv_mlp"]
WRITE_OPTIONS["original"] = ["layout"]
WRITE_OPTIONS["onnx"] = ["via", "opset", "dynamic_hw", "features", "fp16", "external_data", "size", "source_path"]
WRITE_OPTIONS["litert"] = ["features", "fp16", "size"]
WRITE_OPTIONS["openvino"] = ["features", "size"]
WRITE_OPTIONS["executorch"] = ["size", "features"]


@pytest.fixture(scope="module")
def original_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("options") / "atto.pt"
    fixtures.write_fixture(path, "atto", "original", seed=0, num_classes=10)
    return path


def test_misspelt_read_option_is_refused_by_name(original_file):
    with pytest.raises(BadInputError) as info:
        converters.load(original_file, emma=True)
    message = str(info.value)
    assert message == "unknown option 'emma' for reading format 'original'; expected one of: ema, prefix, variant"
    assert info.value.exit_code == 2
    # The correct spelling is accepted and does what it says (this fixture has no model_ema).
    with pytest.raises(BadInputError, match="model_ema"):
        converters.load(original_file, ema=True)


def test_option_of_another_format_is_refused(original_file, tmp_path):
    ckpt = converters.load(original_file)
    canonical = tmp_path / "atto.safetensors"
    converters.save(ckpt, canonical, format="canonical")
    with pytest.raises(BadInputError, match=r"unknown option 'ema' for reading format 'canonical'; expected one of: "
                                            r"variant$"):
        converters.load(canonical, ema=True)


def test_misspelt_write_option_is_refused_before_writing(original_file, tmp_path):
    ckpt = converters.load(original_file)
    dst = tmp_path / "out.safetensors"
    with pytest.raises(BadInputError) as info:
        converters.save(ckpt, dst, format="canonical", overwrit=True)
    assert str(info.value) == "unknown option 'overwrit' for writing format 'canonical'; expected one of: overwrite"
    assert info.value.exit_code == 2
    with pytest.raises(BadInputError, match="unknown option 'layuot' for writing format 'original'; expected one "
                                            "of: layout, overwrite"):
        converters.save(ckpt, tmp_path / "out.pt", format="original", layuot="fcmae")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", list(converters.MODULES))
def test_every_format_declares_its_options_and_nothing_else(name):
    module = converters.format_module(name)
    for function, expected in ((module.read, READ_OPTIONS[name]), (module.write, WRITE_OPTIONS[name])):
        kinds = [p.kind for p in inspect.signature(function).parameters.values()]
        assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{name}.{function.__name__} swallows unknown options"
        assert converters.declared_options(function) == expected, f"{name}.{function.__name__}"


@pytest.mark.parametrize("name", list(converters.MODULES))
def test_every_declared_option_passes_the_check(name, original_file, tmp_path):
    """Each format's declared options, all given at once at their defaults, reach the reader or writer.

    The inputs are chosen so that every reader and writer then stops early on its own (a file of another
    format, an existing destination, an invalid checkpoint): what must never come back is "unknown option".
    """
    module = converters.format_module(name)

    def defaults(function):
        return {p.name: p.default for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY}

    try:
        converters.load(original_file, format=name, **defaults(module.read))
    except ConvNeXtV2Error as exc:
        assert "unknown option" not in str(exc)
    dst = tmp_path / "exists.out"
    dst.write_bytes(b"")
    empty = Checkpoint(config=converters.load(original_file).config, tensors={})
    with pytest.raises(ConvNeXtV2Error) as info:
        converters.save(empty, dst, format=name, **defaults(module.write))
    assert "unknown option" not in str(info.value)


def test_cli_passes_only_options_the_format_has(original_file, tmp_path):
    canonical = tmp_path / "atto.safetensors"
    converters.save(converters.load(original_file), canonical, format="canonical")
    # Without --ema the CLI passes no ema option, so every format reads.
    assert run_cli("inspect", str(canonical)).returncode == 0
    result = run_cli("inspect", str(canonical), "--ema")
    assert result.returncode == 2
    assert "unknown option 'ema' for reading format 'canonical'" in result.stderr
