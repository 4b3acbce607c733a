"""The one registry of runners: name and alias lookup, what runs here, which runner runs a file format."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from convnextv2.converters.runners import artifact, deployment, onnxruntime_runner, peers, references
from convnextv2.converters.runners.base import RecordView, RunContext, Runner, RunnerRecord, Source
from convnextv2.reference.errors import BadInputError

Factory = Callable[[RunnerRecord, Source, RunContext], Runner]


@dataclasses.dataclass
class Entry(RecordView):
    """A registered runner: its record and how to open it on a source."""

    record: RunnerRecord
    factory: Factory

    @property
    def description(self) -> str:
        return self.record.description

    @property
    def dtypes(self) -> tuple[str, ...]:
        return self.record.precisions

    def open(self, source: Source, context: RunContext | None = None) -> Runner:
        return self.factory(self.record, source, context or RunContext())


_CLASSES: dict[str, Factory] = {
    "torch": references.ReferenceRunner, "tensorflow": references.ReferenceRunner,
    "flax": references.ReferenceRunner, "onnxruntime": onnxruntime_runner.OnnxRuntimeRunner,
    "artifact": artifact.ArtifactRunner, "executorch": deployment.ExecuTorchRunner,
    "openvino": deployment.OpenVinoRunner, "litert": deployment.LiteRtRunner, "timm": peers.TimmRunner,
    "transformers-pt": peers.TransformersRunner, "transformers-tf": peers.TransformersRunner,
    "tensorflow-savedmodel": peers.SavedModelRunner,
}
# Registration order is the order runners are listed (and run) in.
REGISTRY: dict[str, Entry] = {
    record.name: Entry(record, _CLASSES[record.name])
    for record in (*references.RECORDS, *onnxruntime_runner.RECORDS, *artifact.RECORDS, *deployment.RECORDS,
                   *peers.RECORDS)
}


def register(record: RunnerRecord, factory: Factory) -> Entry:
    entry = REGISTRY[record.name] = Entry(record, factory)
    return entry


def get(name: str) -> Entry:
    if name in REGISTRY:
        return REGISTRY[name]
    for entry in REGISTRY.values():
        if name in entry.record.aliases:
            return entry
    raise BadInputError(f"unknown runtime {name!r}; expected one of {', '.join(names())}")


def names(kind: str | None = None) -> list[str]:
    return [name for name, entry in REGISTRY.items() if kind is None or entry.kind == kind]


def available(kind: str | None = None) -> list[str]:
    """The runners that can run here (cheap: no framework import)."""
    return [name for name in names(kind) if REGISTRY[name].availability() is None]


# A file is run as it is by an artifact runner first, then by a runtime or a peer that opens its format.
_PREFERENCE = {"artifact": 0, "runtime": 1, "peer": 2, "custom": 3}


def for_format(format: str) -> Entry:
    """The runner that runs a file of ``format`` as it is."""
    fitting = [entry for entry in REGISTRY.values() if format in entry.record.opens]
    if not fitting:
        raise BadInputError(f"no runner runs a {format} file")
    return min(fitting, key=lambda entry: _PREFERENCE.get(entry.kind, 9))
