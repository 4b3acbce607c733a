"""Import peer libraries (timm, transformers) as independent oracles, with this machine's torchvision guarded
(converters/peer_imports.py); the peers' runners are in converters/runners/peers.py."""

from convnextv2.converters.runners.peers import import_timm, import_transformers

__all__ = ["import_timm", "import_transformers"]
