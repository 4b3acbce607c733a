"""ONNX: the format (graphs read back by structure, written by exporting a reference), its exporters and the
onnxruntime sessions that run it.

``reader``: sniff, read, write (the format contract); ``export``: the export through one of three exporters
(``via_torch``, ``via_tensorflow``, ``via_flax``); ``interface``: input and output names every export shares;
``session``: onnxruntime sessions and the export gate.
"""

from convnextv2.converters.onnx.reader import NAME, SUFFIXES, UNNAMED_BUILD, read, sniff, unrepresentable, write

__all__ = ["NAME", "SUFFIXES", "UNNAMED_BUILD", "read", "sniff", "unrepresentable", "write"]
