"""Import peer libraries (timm, transformers) as independent oracles, with this machine's torchvision guarded
(converters/peer_imports.py)."""

from __future__ import annotations

import os
from types import ModuleType

from convnextv2.converters.peer_imports import import_torchvision_guarded


def import_timm() -> ModuleType:
    import_torchvision_guarded()
    import timm

    return timm


def import_transformers(tensorflow: bool = False) -> ModuleType:
    """transformers with only the frameworks asked for (importing TF costs seconds and memory)."""
    if not tensorflow:
        os.environ.setdefault("USE_TF", "0")
        os.environ.setdefault("USE_FLAX", "0")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_torchvision_guarded()
    import transformers

    return transformers
