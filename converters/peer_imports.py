"""Importing the peer libraries (timm, transformers) beside this machine's torchvision.

The only torchvision for torch 2.13 is a CUDA build whose import fails beside CPU torch on one unguarded
fake-kernel registration ("operator torchvision::nms does not exist"); timm and transformers import it.
ConvNeXt V2 uses none of torchvision's compiled ops, so skipping that registration while torchvision imports is
harmless. Here, below `converters.runners.peers` (the peers and their import helpers), so that every import of
a peer uses the one guard.
"""

from __future__ import annotations

from typing import Any


def import_torchvision_guarded() -> None:
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
