"""ExecuTorch export (write-only): a ``.pte`` program with the XNNPACK delegate that the plain ExecuTorch
runtime (``executorch.runtime.Runtime``) loads and runs without this package.

Interface (docs/cli.md, "convert --to executorch"): method ``forward`` takes ``pixel_values`` float32 NCHW
``[batch, 3, size, size]`` (``size`` the checkpoint's input size, fixed at export; batch 1 to ``MAX_BATCH``)
and returns ``logits`` ``[batch, num_classes]``, or ``pooled`` ``[batch, C3]`` for a headless checkpoint.

The canonical metadata (preprocessing, source, config) travels inside the program: a ``.pte`` holds constant
methods, and method ``convnextv2_metadata`` returns one JSON string with the same keys as a canonical file's
metadata plus ``export`` (input, layout, outputs, size, batch range). No companion file.

The program is traced from a contiguous-format copy of the PyTorch reference (torch_model.contiguous_copy;
the channels-last weights of the fast float32 model stop XNNPACK lowering) and runs GRN and LayerNorm in
float32. converters.save runs it in the ExecuTorch runtime and judges it by the parity rule before it is
published; a program that fails is not written (exit 1).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.format_contract import Format, always
from convnextv2.converters.format_limits import Change, dropped_extras
from convnextv2.converters.onnx.interface import INPUT_NAME, STRIDE, output_names
from convnextv2.reference.errors import BadInputError, MissingDependencyError

NAME = "executorch"

METHOD = "forward"
METADATA_METHOD = "convnextv2_metadata"
# ExecuTorch plans activation memory for the largest shape a program accepts, allocated when the method loads:
# the batch bound is what every load pays for (base at 224, batch 16: about 0.5 GB).
MAX_BATCH = 16
# ExecuTorch's flatbuffer file identifier, bytes 4..8 of every .pte.
_MAGIC = b"ET12"
INSTALL_HINT = "pip install 'convnextv2-toolkit[executorch]'"


def why_unavailable() -> str | None:
    missing = [m for m in ("torch", "executorch") if importlib.util.find_spec(m) is None]
    return f"the ExecuTorch export needs {', '.join(missing)}: {INSTALL_HINT}" if missing else None


def sniff(path: Path) -> bool:
    # Recognised so that `inspect`/`convert` on a .pte say why it cannot be read, instead of "unknown format".
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(8)[4:8] == _MAGIC


def read(path: Path, *, variant: str | None = None) -> Checkpoint:
    # variant is every reader's option; declared so the refusal below is what a caller passing it sees.
    raise BadInputError(
        f"{path}: reading ExecuTorch programs is not supported (a .pte holds a lowered, delegated graph whose "
        "weights carry no ConvNeXt V2 names to map back). Convert from the checkpoint it was exported from")


def unrepresentable(ckpt: Checkpoint, path: Path, options: Mapping[str, Any]) -> list[Change]:
    return dropped_extras(ckpt, "an ExecuTorch program")


def write(ckpt: Checkpoint, path: Path, *, size: int | None = None, features: bool = False) -> None:
    """Lower ``ckpt`` to a .pte at ``path`` for images of ``size`` (default: the checkpoint's input size);
    written, not checked: converters.save runs it in the ExecuTorch runtime against the float64 referee before
    it publishes it. ``features`` returns every stage as well (the parity harness compares them)."""
    write_with(ckpt, path, None, size=size, features=features)


def write_with(ckpt: Checkpoint, path: Path, cache: Any, *, size: int | None = None, features: bool = False,
               metadata_exact: bool = True) -> str:
    """:func:`write`, through the architecture's template in ``cache`` (converters/templates.py): the lowered
    program of the probe checkpoint with these weights written into its XNNPACK named data and constant segments.
    The program's metadata method is serialized inside the program: with ``metadata_exact`` (what a user is given)
    a template is used only when its metadata is already this checkpoint's, else the program is built afresh; the
    parity harness passes False (its program is never handed to a user, its metadata never read). Returns how
    the file was built."""
    reason = why_unavailable()
    if reason:
        raise MissingDependencyError(reason)
    ckpt.validate(f"exporting {path}")
    size = int(size or ckpt.preprocessing.input_size)
    if size % STRIDE or size < STRIDE:
        raise BadInputError(f"{path}: image size {size} is not a positive multiple of {STRIDE}")
    if cache is None:
        Path(path).write_bytes(program_bytes(ckpt, size, features=features))
        return "built"
    from convnextv2.converters import templates

    why = ("the program's metadata method is serialized with its code (the toolkit cannot restamp it without "
           "re-serializing the program)") if metadata_exact else None
    if why is None:
        files = templates.substituted(
            cache, "executorch", ckpt, {"size": size, "features": features},
            lambda probe, folder: (folder / "model.pte").write_bytes(program_bytes(probe, size, features=features)),
            templates.executorch_located)
        if not isinstance(files, str):
            Path(path).write_bytes(files["model.pte"])
            return templates.TEMPLATE
        why = files
    Path(path).write_bytes(program_bytes(ckpt, size, features=features))
    return templates.afresh(why)


def metadata(ckpt: Checkpoint, size: int, features: bool) -> str:
    meta: dict[str, Any] = {k: v for k, v in ckpt.metadata().items() if k != "format"}
    meta["export"] = json.dumps({"input": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "size": size,
                                 "batch": [1, MAX_BATCH], "outputs": output_names(ckpt, features),
                                 "delegate": "xnnpack"}, sort_keys=True, separators=(",", ":"))
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def exportable_module(ckpt: Checkpoint, features: bool, *, channels_last: bool = False) -> Any:
    """The PyTorch reference as the program's ``forward``: a tuple of the exported outputs, in
    ``output_names`` order. ``channels_last=True`` keeps build_torch's layout (only to show why it fails)."""
    from torch import nn

    from convnextv2 import reference
    from convnextv2.reference import torch_model

    model = reference.build(ckpt, "torch")
    if not channels_last:
        model = torch_model.contiguous_copy(model)
    names = output_names(ckpt, features)

    class Program(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: Any) -> Any:
            outputs = self.model.forward_features(pixel_values)
            return tuple(outputs[name] for name in names)

    return Program().eval()


def program_bytes(ckpt: Checkpoint, size: int, *, features: bool, channels_last: bool = False) -> bytes:
    """torch.export, then XNNPACK lowering and ExecuTorch serialisation: the .pte's bytes."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module = exportable_module(ckpt, features, channels_last=channels_last)
    # Batch 2, not 1: torch.export specialises a dimension whose example value is 1.
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        exported = torch.export.export(module, (example,), dynamic_shapes={"pixel_values": {0: batch}})
    lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                          constant_methods={METADATA_METHOD: metadata(ckpt, size, features)})
    return bytes(lowered.to_executorch().buffer)


def _method(path: Path, name: str) -> Any:
    """Method ``name`` of the program, loaded by the ExecuTorch C++ runtime and verified as
    ``executorch.runtime.Runtime`` verifies it: a callable from a list of inputs to a list of outputs.

    The public ``executorch.runtime`` wrapper imports the whole exporter (``executorch.exir``: 8 s on two cores)
    only to reach this prebuilt extension; a parity run that finds its program cached never needs the exporter.
    The calls are the ones the wrapper makes; an ExecuTorch without them falls back to the wrapper.
    parity_tests/test_executorch.py loads the same files through the public wrapper.
    """
    import torch  # noqa: F401  (the extension links against libtorch: loaded first)

    try:
        from executorch.extension.pybindings import _C as runtime  # type: ignore[import-not-found]

        load, verification = runtime._load_program, runtime.Verification.InternalConsistency
    except (ImportError, AttributeError):
        from executorch.runtime import Runtime

        return Runtime.get().load_program(Path(path)).load_method(name).execute
    program = load(str(path), enable_etdump=False, debug_buffer_size=0, program_verification=verification,
                   data_path=None)
    method = program.load_method(name)
    # The wrapper's Method.execute is this call; the program must outlive the method.
    return lambda inputs: (program, method(inputs))[1]


def run_program(path: Path, images_nchw: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Run the program's ``forward`` in the ExecuTorch runtime, in chunks of at most MAX_BATCH images."""
    import torch

    forward = _method(path, METHOD)
    chunks: list[list[np.ndarray]] = []
    images = np.ascontiguousarray(images_nchw, dtype=np.float32)
    for start in range(0, len(images), MAX_BATCH):
        outputs = forward([torch.from_numpy(images[start:start + MAX_BATCH].copy())])
        chunks.append([np.ascontiguousarray(o.numpy()) for o in outputs])
    return {name: np.concatenate([chunk[i] for chunk in chunks]) for i, name in enumerate(names)}


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata a program carries, read through the ExecuTorch runtime as any user would."""
    value = _method(path, METADATA_METHOD)([])[0]
    data: dict[str, Any] = json.loads(value)
    return data


# One file that the runtime checking it opens by content: conversions build it unnamed. read() exists only to
# refuse with a reason; the command line does not offer --from executorch.
FORMAT = Format(NAME, sniff, read, write, readable=False, unnamed_build=always, unrepresentable=unrepresentable,
                runner="executorch", gated=True)
