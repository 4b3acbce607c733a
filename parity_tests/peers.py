"""Import peer libraries (timm, transformers) as independent oracles, working around this machine's
torchvision: the only torchvision for torch 2.13 is a CUDA build whose import fails beside CPU torch on
one unguarded fake-kernel registration ("operator torchvision::nms does not exist"). ConvNeXt V2 uses none of torchvision's compiled ops,
so skipping that registration while torchvision imports is harmless."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any


def _import_torchvision_guarded() -> None:
    import torch
    import torch.library

    original = torch.library.register_fake

    def register_fake(op: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda fn=None, *a, **k: fn
        return original(op, *args, **kwargs)

    torch.library.register_fake = register_fake  # type: ignore[assignment]
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass  # not installed: timm then fails on its own import with a clear message
    finally:
        torch.library.register_fake = original  # type: ignore[assignment]


def import_timm() -> ModuleType:
    _import_torchvision_guarded()
    import timm

    return timm


def import_transformers(tensorflow: bool = False) -> ModuleType:
    """transformers with only the frameworks asked for (importing TF costs seconds and memory)."""
    if not tensorflow:
        os.environ.setdefault("USE_TF", "0")
        os.environ.setdefault("USE_FLAX", "0")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _import_torchvision_guarded()
    import transformers

    return transformers
