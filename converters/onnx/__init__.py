"""ONNX: the format (graphs read back by structure, written by exporting a reference), its exporters and the
onnxruntime sessions that run it.

``reader``: sniff, read and what a graph cannot hold; ``export``: the writing side, through one of three
exporters (``via_torch``, ``via_tensorflow``, ``via_flax``); ``interface``: input and output names every export
shares; ``session``: onnxruntime sessions. ``FORMAT`` is the format's record.
"""

from convnextv2.converters.format_contract import Format
from convnextv2.converters.onnx.export import companions, output_bytes, unnamed_build, unrepresentable, write
from convnextv2.converters.onnx.reader import NAME, read, sniff

FORMAT = Format(NAME, sniff, read, write, companions=companions, unnamed_build=unnamed_build,
                unrepresentable=unrepresentable, runner="onnxruntime", gated=True, output_bytes=output_bytes)

__all__ = ["FORMAT", "NAME", "read", "sniff", "unrepresentable", "write"]
