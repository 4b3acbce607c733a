"""The torch-zip reader runs no pickled code, needs no torch, and agrees with torch.load(weights_only=True);
bad files fail with a clear message, exit code 2 and no output."""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from convnextv2 import converters, fixtures
from convnextv2.converters.torchzip import read_torch_zip
from convnextv2.parity_tests.conftest_helpers import run_cli
from convnextv2.reference.errors import BadInputError, UnsafeCheckpointError

torch = pytest.importorskip("torch")


class _RunsShell:
    """Pickles to os.system(command): what a hostile checkpoint hides in its pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _torch_load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_reader_matches_torch_load_on_torch_written_files(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=generator).to(dtype)
    state = collections.OrderedDict(
        plain=base,
        transposed=base.t(),  # non-contiguous view: shares the storage, strides differ
        sliced=base[2:, 1:4],  # non-zero storage offset
        scalar=torch.tensor(3, dtype=dtype),
        empty=torch.zeros(0, 4, dtype=dtype),
    )
    path = tmp_path / "t.pt"
    torch.save({"model": state, "epoch": "best", "args": argparse.Namespace(lr=0.1, tag=b"\x00\xff")}, path)
    ours = read_torch_zip(path)
    theirs = _torch_load(path)
    for key, tensor in theirs["model"].items():
        reference = tensor.float().numpy() if dtype == torch.bfloat16 else tensor.numpy()
        mine = ours["model"][key].astype(np.float32) if dtype == torch.bfloat16 else ours["model"][key]
        assert mine.shape == reference.shape and np.array_equal(mine, reference), key
    assert ours["epoch"] == "best" and ours["args"].lr == 0.1 and ours["args"]["tag"] == b"\x00\xff"


@pytest.mark.parametrize("fmt", ["original", "fcmae", "fcmae-sparse"])
def test_torch_load_reads_our_files_identically(tmp_path, fmt):
    path = tmp_path / "ours.pt"
    fixtures.write_fixture(path, "atto", fmt)
    theirs = _torch_load(path)
    ours = read_torch_zip(path)
    assert list(theirs["model"]) == list(ours["model"])
    for key, tensor in theirs["model"].items():
        assert np.array_equal(tensor.numpy(), ours["model"][key]), key
    assert theirs["args"].model == "convnextv2_atto"
    # torch maps storages only from aligned entries; our writer pads them as torch.save does.
    with torch.serialization.safe_globals([argparse.Namespace]):
        mapped = torch.load(path, weights_only=True, mmap=True)
    for key, tensor in theirs["model"].items():
        assert torch.equal(mapped["model"][key], tensor), key


def test_storages_are_mapped_not_copied(tmp_path):
    path = tmp_path / "ours.pt"
    fixtures.write_fixture(path, "atto", "original")
    state = read_torch_zip(path)["model"]
    weight = state["stages.2.3.pwconv1.weight"]
    assert not weight.flags.owndata and not weight.flags.writeable
    base = weight
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert not isinstance(base, np.ndarray)  # the chain ends at the file mapping, not a numpy copy


def _hostile_checkpoint(tmp_path, where: str):
    marker = tmp_path / f"pwned-{where}"
    payload = _RunsShell(f"touch {marker}")
    state = {"stem": torch.zeros(2)}
    obj: dict[str, object]
    if where == "model":
        obj = {"model": payload}
    elif where == "args":
        obj = {"model": state, "args": payload}
    else:
        obj = {"model": state, "epoch": [1, {"nested": payload}]}
    path = tmp_path / f"hostile-{where}.pt"
    torch.save(obj, path)  # torch.save pickles the __reduce__ as torch.load(weights_only=False) would run it
    return path, marker


@pytest.mark.parametrize("where", ["model", "args", "nested"])
def test_code_in_the_pickle_never_runs(tmp_path, where):
    path, marker = _hostile_checkpoint(tmp_path, where)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing pickled global (posix|os)\.system"):
        read_torch_zip(path)
    result = run_cli("convert", str(path), "-o", str(tmp_path / "out.safetensors"), "--to", "canonical")
    assert result.returncode == 2
    assert "posix.system" in result.stderr or "os.system" in result.stderr
    assert not marker.exists(), "the pickled os.system ran"
    assert not (tmp_path / "out.safetensors").exists()
    # The check is meaningful: the same file does run the command when unpickled without restrictions.
    control = tmp_path / "control.pt"
    torch.save({"x": _RunsShell(f"touch {tmp_path / 'control-ran'}")}, control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "control-ran").exists()


def test_reading_works_where_torch_cannot_be_imported(tmp_path):
    path = tmp_path / "ckpt.pt"
    fixtures.write_fixture(path, "atto", "fcmae-sparse", seed=4)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        "from convnextv2 import converters\n"
        "c = converters.load(sys.argv[1])\n"
        "converters.save(c, sys.argv[2])\n"
        "try:\n    import torch\nexcept ImportError:\n    print('torch-blocked')\n"
        "print(c.config.variant, len(c.tensors))\n"
    )
    out = tmp_path / "out.safetensors"
    result = subprocess.run([sys.executable, "-c", code, str(path), str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torch-blocked" in result.stdout and "atto" in result.stdout
    expected = converters.load(path)
    written = converters.load(out)
    for name, value in expected.tensors.items():
        assert np.array_equal(np.asarray(value), written.tensors[name]), name


def _expect_cli_failure(tmp_path, src, *needles):
    dst = tmp_path / "out.safetensors"
    result = run_cli("convert", str(src), "-o", str(dst), "--to", "canonical")
    assert result.returncode == 2, (result.returncode, result.stderr)
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert "Traceback" not in result.stderr
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_truncated_file(tmp_path):
    src = tmp_path / "full.pt"
    fixtures.write_fixture(src, "atto", "original")
    cut = tmp_path / "cut.pt"
    data = src.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _expect_cli_failure(tmp_path, cut, str(cut), "truncated")


def test_random_bytes(tmp_path):
    src = tmp_path / "noise.pt"
    src.write_bytes(np.random.default_rng(0).bytes(4096))
    _expect_cli_failure(tmp_path, src, str(src), "cannot tell which checkpoint format")
    result = run_cli("convert", str(src), "--from", "original", "-o", str(tmp_path / "o.safetensors"),
                     "--to", "canonical")
    assert result.returncode == 2 and "not a torch zip checkpoint" in result.stderr


def test_legacy_format_gets_instructions(tmp_path):
    src = tmp_path / "old.pt"
    torch.save({"model": {"a": torch.zeros(2)}}, src, _use_new_zipfile_serialization=False)
    with pytest.raises(BadInputError, match=r"legacy \(pre-1.6\).*torch.save\(torch.load\('OLD.pt', weights_only=True\)"):
        converters.load(src)


def _write_state(path, state):
    from convnextv2.converters.torchzip import write_torch_zip

    write_torch_zip(path, {"model": state})


def test_missing_block_names_every_tensor(tmp_path):
    from convnextv2.converters.original import canonical_to_state_dict

    state = canonical_to_state_dict(fixtures.make_checkpoint("atto", 0, "original"), "finetuned")
    for key in [k for k in state if k.startswith("stages.2.3.")]:
        del state[key]
    src = tmp_path / "gap.pt"
    _write_state(src, state)
    _expect_cli_failure(tmp_path, src, "missing tensor stages.2.blocks.3.dwconv.weight: expected shape [160, 1, 7, 7]",
                        "missing tensor stages.2.blocks.3.grn.gamma", "10 problem(s)")


def test_misshaped_tensor_names_expected_and_found(tmp_path):
    from convnextv2.converters.original import canonical_to_state_dict

    state = canonical_to_state_dict(fixtures.make_checkpoint("atto", 0, "original"), "finetuned")
    state["stages.1.0.pwconv2.weight"] = np.zeros((80, 300), dtype=np.float32)
    src = tmp_path / "shape.pt"
    _write_state(src, state)
    _expect_cli_failure(tmp_path, src, "tensor stages.1.blocks.0.pwconv2.weight: expected shape [80, 320], found [80, 300]")


def test_unknown_key_is_named(tmp_path):
    from convnextv2.converters.original import canonical_to_state_dict

    state = canonical_to_state_dict(fixtures.make_checkpoint("atto", 0, "original"), "finetuned")
    state["stages.0.0.gamma"] = np.ones(40, dtype=np.float32)  # V1 layer scale: not in V2
    src = tmp_path / "v1ish.pt"
    _write_state(src, state)
    _expect_cli_failure(tmp_path, src, "stages.0.0.gamma [40]", "not in the finetuned layout")


def test_duplicate_and_compressed_entries_are_refused(tmp_path):
    src = tmp_path / "ok.pt"
    fixtures.write_fixture(src, "atto", "original")
    compressed = tmp_path / "compressed.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with pytest.raises(BadInputError, match="is compressed"):
        read_torch_zip(compressed)
    duplicated = tmp_path / "dup.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(duplicated, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zout.writestr(zin.infolist()[0].filename, b"x")
    with pytest.raises(BadInputError, match="duplicate entries"):
        read_torch_zip(duplicated)
