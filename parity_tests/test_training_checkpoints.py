"""Training checkpoints as mmengine's Runner writes them (``epoch_3.pth``), read without running anything.

The files come from a real ``mmengine.runner.Runner`` trained for three tiny epochs, its ``CheckpointHook``
saving them: ``meta``, ``state_dict`` (a ConvNeXt V2 atto in the facebookresearch naming, from the toolkit's
fixture maker, alone or under ``backbone.``), ``message_hub`` (``HistoryBuffer`` objects, numpy scalars),
``optimizer`` (AdamW's state after its steps) and ``param_schedulers``. ``torch.load(weights_only=True)`` refuses
such a file, which is why people load it unsafely; ``torch.load(weights_only=False)`` is the oracle here (the
test made the file). Payloads are planted through mmengine's own ``before_save_checkpoint`` hook.

The runner trains in a subprocess: it sets seeds, logging and global registries that should not leak into the
test process. mmengine is not among the toolkit's pins: these tests run in ``nox -s tests_mmpretrain``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from convnextv2 import converters
from convnextv2.converters.cli import main
from convnextv2.converters.original import canonical_to_state_dict
from convnextv2.converters.state_files import select_weights
from convnextv2.converters.torchzip import read_torch_zip
from convnextv2.reference.errors import UnsafeCheckpointError

pytestmark = pytest.mark.mmpretrain

EPOCHS = 3
# name -> (the weights under "backbone." as a detector/classifier wrapper keeps them, what is planted where)
RUNS: dict[str, tuple[bool, tuple[str, str] | None]] = {
    "plain": (False, None),
    "backbone": (True, None),
    "zipfile-in-message-hub": (False, ("message_hub", "zipfile")),
    "zipfile-in-weights": (False, ("state_dict", "zipfile")),
    "os-system-in-message-hub": (False, ("message_hub", "os_system")),
}
HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"


# ------------------------------------------------------------------ the files, written by mmengine's Runner

class Planted:
    """Pickles as a call of a global that creates ``marker``: what an unsafe load runs."""

    def __init__(self, kind: str, marker: str):
        self.kind, self.marker = kind, marker

    def __reduce__(self) -> tuple[Any, ...]:
        import zipfile

        if self.kind == "zipfile":  # not a code module: read as a placeholder, never constructed
            return zipfile.ZipFile, (self.marker, "w")
        return os.system, (f"touch {self.marker}",)


def _plant_parameters(module: Any, state: Mapping[str, np.ndarray]) -> None:
    """Register each tensor of ``state`` as a parameter at its dotted name, so that ``module.state_dict()``
    is exactly the facebookresearch naming."""
    import torch
    from torch import nn

    for key, value in state.items():
        *path, leaf = key.split(".")
        owner = module
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]
        owner.register_parameter(leaf, nn.Parameter(torch.from_numpy(np.array(value))))


def _train(root: Path, name: str) -> Path:
    import torch
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from mmengine.visualization import Visualizer

    from convnextv2.fixtures.make import make_checkpoint

    wrapped, plant = RUNS[name]
    state = canonical_to_state_dict(make_checkpoint("atto", 0, "original"), "finetuned")

    class Classifier(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            if wrapped:
                self.backbone = torch.nn.Module()
            _plant_parameters(self.backbone if wrapped else self, state)

        def forward(self, inputs: Any, data_samples: Any = None, mode: str = "tensor") -> Any:
            scale = torch.stack(inputs).mean()
            return {"loss": sum((p * scale).square().mean() for p in self.parameters())}

    class Images(torch.utils.data.Dataset):
        metainfo = {"classes": ("cat", "dog")}

        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> dict[str, Any]:
            return {"inputs": torch.full((3, 8, 8), float(index + 1))}

    class Plant(Hook):
        def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
            assert plant is not None
            where, kind = plant
            planted = Planted(kind, str(root / f"{name}.marker"))
            if where == "message_hub":
                checkpoint["message_hub"]["runtime_info"]["planted"] = planted
            else:
                checkpoint["state_dict"]["head.bias"] = planted

    class NoFigures(Visualizer):
        # The visualizer draws with matplotlib, which nothing else here needs: no figure, no drawing.
        def _initialize_fig(self, fig_cfg: Any) -> tuple:
            import types

            return None, types.SimpleNamespace(get_dpi=lambda: 100), None

    work_dir = root / name
    runner = Runner(
        model=Classifier(), work_dir=str(work_dir), experiment_name=name,
        train_dataloader=dict(dataset=Images(), sampler=dict(type="DefaultSampler", shuffle=False), batch_size=2,
                              num_workers=0, collate_fn=dict(type="pseudo_collate")),
        train_cfg=dict(by_epoch=True, max_epochs=EPOCHS),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
        param_scheduler=[dict(type="LinearLR", start_factor=0.1, by_epoch=True, begin=0, end=1),
                         dict(type="CosineAnnealingLR", by_epoch=True, begin=1, T_max=EPOCHS)],
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=EPOCHS)),  # saves epoch_3.pth
        custom_hooks=[Plant()] if plant else None,
        visualizer=NoFigures.get_instance(name, vis_backends=[]),
        randomness=dict(seed=0), log_level="WARNING")
    runner.train()
    return work_dir / f"epoch_{EPOCHS}.pth"


def make_runs(root: str) -> None:
    """Every run of ``RUNS`` under ``root`` (what the subprocess does)."""
    from convnextv2.converters.peer_imports import import_torchvision_guarded

    import_torchvision_guarded()
    for name in RUNS:
        _train(Path(root), name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mmengine-runs")
    code = f"from {__name__} import make_runs; import sys; make_runs(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    paths = {name: root / name / f"epoch_{EPOCHS}.pth" for name in RUNS}
    assert all(path.is_file() for path in paths.values()), done.stderr[-4000:]
    assert not list(root.glob("*.marker")), "writing the files ran a payload"
    return paths


# ------------------------------------------------------------------ the oracle: torch.load(weights_only=False)

def _unsafe_load(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _pickled_global(obj: Any) -> str:
    """The global pickle names for ``obj`` (its class through copyreg.__newobj__, else its reduce function)."""
    reduced = obj.__reduce_ex__(2)
    by_class = reduced[0].__name__ == "__newobj__"  # copyreg.__newobj__ (not in typeshed): NEWOBJ on the class
    target = reduced[1][0] if by_class else reduced[0]
    return f"{target.__module__}.{getattr(target, '__qualname__', target.__name__)}"


def _foreign_objects(value: Any) -> dict[str, int]:
    """Objects other than plain data and tensors in ``value``, by the global their pickle names (not looking
    inside them: their state is what a placeholder drops)."""
    import torch

    found: dict[str, int] = {}
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif type(item) not in (str, bytes, int, float, bool, type(None)) and not isinstance(item, torch.Tensor):
            # By exact type: numpy's float64 is a float, yet pickles as a numpy scalar.
            name = _pickled_global(item)
            found[name] = found.get(name, 0) + 1
    return dict(sorted(found.items()))


# ------------------------------------------------------------------ reading what the runner wrote

def test_weights_only_load_refuses_it(runs):
    """Why people fall back to unsafe loading: torch's safe mode stops at mmengine's HistoryBuffer."""
    import pickle

    import torch

    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer"):
        torch.load(runs["plain"], weights_only=True)


@pytest.mark.parametrize("run", ["plain", "backbone"])
def test_weights_read_exactly_and_the_rest_is_named(runs, run):
    path = runs[run]
    oracle = _unsafe_load(path)
    assert set(oracle) == {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"}
    expected = {key: value.numpy() for key, value in oracle["state_dict"].items()}

    weights = select_weights(read_torch_zip(path), str(path))
    assert list(weights.state) == list(expected)
    for key, array in expected.items():
        ours = weights.state[key]
        assert ours.dtype == array.dtype and ours.shape == array.shape, key
        assert ours.tobytes() == array.tobytes(), key

    hub = _foreign_objects(oracle["message_hub"])
    # The logged scalars (loss, lr, times) are HistoryBuffers; runtime info holds numpy scalars (the eta).
    assert HISTORY_BUFFER in hub and any(name.startswith("numpy.") for name in hub), hub
    assert weights.skipped == {"meta": _foreign_objects(oracle["meta"]), "message_hub": hub,
                               "optimizer": _foreign_objects(oracle["optimizer"]),
                               "param_schedulers": _foreign_objects(oracle["param_schedulers"])}
    note = weights.skipped_note()
    held = ", ".join(f"{name} x{count}" for name, count in hub.items())
    assert note is not None and f"message_hub ({held})" in note, note
    assert re.search(r"\boptimizer\b", note) and re.search(r"\bparam_schedulers\b", note), note

    ckpt = converters.load(path)
    assert ckpt.source.format == "original" and ckpt.config.variant == "atto" and ckpt.config.num_classes == 1000
    assert ckpt.info["skipped"]["message_hub"] == hub
    prefix = "backbone." if run == "backbone" else ""
    assert ckpt.source.layout.get("prefix", "") == prefix
    back = canonical_to_state_dict(ckpt, "finetuned")
    assert [prefix + key for key in back] == list(expected)
    for key, array in back.items():
        assert np.array_equal(array, expected[prefix + key]), key


@pytest.mark.parametrize("run", ["plain", "backbone"])
def test_inspect_and_convert_through_the_cli(runs, run, tmp_path):
    path = runs[run]
    cli = CliRunner()
    shown = cli.invoke(main, ["inspect", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "message_hub" in shown.output and "atto" in shown.output
    as_json = cli.invoke(main, ["inspect", "--json", str(path)])
    assert as_json.exit_code == 0, as_json.output
    assert HISTORY_BUFFER in json.loads(as_json.output)["info"]["skipped"]["message_hub"]

    out = tmp_path / "converted.safetensors"
    done = cli.invoke(main, ["convert", str(path), "-o", str(out), "--to", "canonical"])
    assert done.exit_code == 0, done.output
    source, converted = converters.load(path), converters.load(out)
    assert set(converted.tensors) == set(source.tensors)
    for key, array in source.tensors.items():
        assert np.array_equal(converted.tensors[key], array), key


def test_reader_imports_nothing_of_mmengine(runs):
    """The placeholders stand in for mmengine's classes: a fresh process that reads the file (with mmengine
    importable) never imports it."""
    script = (
        "import importlib.util, json, sys\n"
        "assert importlib.util.find_spec('mmengine') is not None, 'mmengine must be importable for this check'\n"
        "from convnextv2 import converters\n"
        "ckpt = converters.load(sys.argv[1])\n"
        "assert 'message_hub' in ckpt.info['skipped']\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('mmengine', 'mmcv', 'mmpretrain'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(runs["plain"])], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CONVNEXTV2_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


# ------------------------------------------------------------------ payloads planted through mmengine's hook

def _marker(path: Path) -> Path:
    return path.parents[1] / f"{path.parent.name}.marker"


def test_reduce_in_the_message_hub_never_runs(runs):
    path = runs["zipfile-in-message-hub"]
    ckpt = converters.load(path)
    assert not _marker(path).exists(), "THE PLANTED CALL RAN"
    assert ckpt.info["skipped"]["message_hub"]["zipfile.ZipFile"] == 1
    assert ckpt.config.variant == "atto"
    # The payload is real: an unsafe load runs it (in its own process, mmengine importable there).
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _marker(path).exists(), "the planted call is not a payload: torch.load did not create the marker"
    _marker(path).unlink()


@pytest.mark.parametrize("run, named", [("zipfile-in-weights", r"zipfile\.ZipFile"),
                                        ("os-system-in-message-hub", r"(os|posix)\.system")])
def test_payload_refused_by_name(runs, run, named, tmp_path):
    """A placeholder where the weights are, and a code-running global anywhere, are refused by name."""
    path = runs[run]
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing pickled global {named}\b") as refused:
        converters.load(path)
    assert str(path) in str(refused.value)
    out = tmp_path / "out.safetensors"
    done = CliRunner().invoke(main, ["convert", str(path), "-o", str(out), "--to", "canonical"])
    assert done.exit_code == 2, done.output
    assert done.output.startswith("error: ") and "Traceback" not in done.output
    assert re.search(rf"refusing pickled global {named}\b", done.output), done.output
    assert not out.exists() and not _marker(path).exists()
