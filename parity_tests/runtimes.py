"""The runtimes and peers the parity harness runs: the registered runners (converters/runners) that open a
checkpoint, and ``Runtime``, a custom runtime given as a function (the traps, test doubles).

A runtime returns numpy ``stem``, ``stage1``..``stage4`` (NCHW), ``pooled`` (B, C3) and ``logits`` (B, K); a
peer that does not expose a feature leaves it out, and the harness reports it as "not exposed".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.runners import registry
from convnextv2.converters.runners.base import FeatureFunction, FunctionRunner, RunContext, Runner, RunnerRecord
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.parity_rule import DETAIL_KEY

__all__ = ["DETAIL_KEY", "RUNTIMES", "Runtime", "get", "runtime_names"]


@dataclasses.dataclass
class Runtime:
    """A runtime given as a function of (checkpoint, images, precision)."""

    name: str
    kind: str  # "custom" for our test doubles and traps
    description: str
    features: FeatureFunction
    requires: tuple[str, ...] = ()
    extra: str = ""
    dtypes: tuple[str, ...] = ("float32",)
    blocker: Callable[[], str | None] | None = None

    @property
    def record(self) -> RunnerRecord:
        return RunnerRecord(self.name, self.kind, self.description, extra=self.extra, requires=self.requires,
                            precisions=self.dtypes, blocker=self.blocker)

    def availability(self) -> str | None:
        return self.record.availability()

    def open(self, ckpt: Checkpoint, context: RunContext | None = None) -> Runner:
        return FunctionRunner(self.record, ckpt, self.features, context)


# The registered runners that open a checkpoint (the artifact runners open files only).
RUNTIMES: dict[str, registry.Entry | Runtime] = {
    name: entry for name, entry in registry.REGISTRY.items() if entry.kind in ("runtime", "peer")}


def get(name: str) -> registry.Entry | Runtime:
    if name not in RUNTIMES:
        raise BadInputError(f"unknown runtime {name!r}; expected one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def runtime_names(kind: str) -> list[str]:
    return [name for name, runtime in RUNTIMES.items() if runtime.kind == kind]
