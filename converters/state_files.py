"""A bare state dict on disk, as transformers and timm save one: a safetensors file or a torch zip.

Read through our own validating readers (no ``torch``, no pickled code run); ``peek_keys`` lets sniffers
look at the tensor names without touching tensor data.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from convnextv2.converters.safetensors_io import is_safetensors, read_safetensors, sniff_header
from convnextv2.converters.torchzip import is_torch_zip, read_torch_zip
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError


def read_state_file(path: Path, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, safetensors metadata) of a safetensors file or a bare torch-zip state dict (safe reader)."""
    if is_safetensors(path):
        return read_safetensors(path)
    if is_torch_zip(path):
        obj = read_torch_zip(path)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not obj:
            raise BadInputError(f"{where}: expected a state dict, found {type(obj).__name__}")
        bad = [str(k) for k, v in obj.items() if not isinstance(v, np.ndarray)]
        if bad:
            raise BadInputError(f"{where}: the state dict holds non-tensor entries {bad[:5]}")
        return {str(k): v for k, v in obj.items()}, {}
    raise BadInputError(f"{where}: not a safetensors file or a torch zip state dict")


def peek_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file or torch zip without touching tensor data; [] when unreadable."""
    try:
        found = sniff_header(path)
        if found is not None:
            header, meta = found
            if meta.get("schema") == schema.SCHEMA_NAME:
                return []  # a canonical file
            return [k for k in header if k != "__metadata__"]
        if is_torch_zip(path):
            obj = read_torch_zip(path)
            if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
                obj = obj["state_dict"]
            return [str(k) for k in obj] if isinstance(obj, Mapping) else []
    except Exception:  # a sniffer must answer, never raise
        return []
    return []

