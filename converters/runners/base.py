"""The Runner contract: what a runner is (its record), what it is given (a run context), what it does.

A runner opens either a checkpoint (building the export it needs through the cache it is given) or a file made
anywhere (an ONNX graph, an IR, a .tflite, a .pte, a SavedModel, a timm or Hugging Face folder), and returns the
stage features (``reference.parity_rule.FEATURES``) for images at a precision; a feature it cannot expose it leaves
out. ``reference.parity_rule.check`` judges what it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint

KINDS = ("runtime", "peer", "artifact", "custom")


@dataclasses.dataclass(frozen=True)
class RunnerRecord:
    """What a runner is, answered without importing its framework."""

    name: str
    kind: str  # runtime (our implementations) | peer (independent libraries) | artifact (a file as given) | custom
    description: str
    aliases: tuple[str, ...] = ()
    extra: str = ""  # the pip extra that installs ``requires``
    requires: tuple[str, ...] = ()  # Python modules that must be importable (found, not imported)
    worker: str = ""  # the worker group it shares (an export or a framework import); empty: its own
    precisions: tuple[str, ...] = ("float32",)
    opens: tuple[str, ...] = ()  # file formats it runs as they are
    # A reason installing ``requires`` would not fix (an installed library without the classes the runner needs);
    # asked first, so the user is told the decisive reason. Must stay cheap: no framework import.
    blocker: Callable[[], str | None] | None = None
    # Runs in a process of its own (transformers decides once per process whether TensorFlow is enabled).
    isolated: bool = False
    file_label: str = ""  # how a check of a file names it, where that differs from the description

    def availability(self) -> str | None:
        """None when the runner can run here, else the reason it cannot."""
        if self.blocker is not None:
            reason = self.blocker()
            if reason is not None:
                return reason
        for module in self.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                hint = f"; install it with: pip install 'convnextv2-toolkit[{self.extra}]'" if self.extra else ""
                return f"{module} is not installed{hint}"
        return None


class ArtifactCache(Protocol):
    """Where runners keep what they build (parity_tests.cache.ParityCache is one)."""

    persistent: bool
    root: Path | None
    hits: list[str]

    @property
    def enabled(self) -> bool: ...
    def digest(self, ckpt: Checkpoint) -> str: ...
    def folder(self, kind: str, parts: Mapping[str, Any],
               build: Callable[[Path], None]) -> contextlib.AbstractContextManager[Path]: ...
    def being_built(self, kind: str, parts: Mapping[str, Any]) -> bool: ...


class TemporaryCache:
    """No cache: every artifact built afresh in a temporary folder, removed after use."""

    persistent = False
    root: Path | None = None
    enabled = False

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.misses: list[str] = []

    def digest(self, ckpt: Checkpoint) -> str:
        return ""

    def being_built(self, kind: str, parts: Mapping[str, Any]) -> bool:
        return False

    @contextlib.contextmanager
    def folder(self, kind: str, parts: Mapping[str, Any], build: Callable[[Path], None]) -> Iterator[Path]:
        self.misses.append(kind)
        with tempfile.TemporaryDirectory(prefix=f"convnextv2-{kind}-") as tmp:
            build(Path(tmp))
            yield Path(tmp)


@dataclasses.dataclass
class Timings:
    """Seconds per phase of one run (import, export, build, compile, forward; repeated phases add up) and each
    artifact it used, cached or built."""

    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


@dataclasses.dataclass
class RunContext:
    """What a runner is given: the cache its exports go through and where its timings go."""

    cache: ArtifactCache = dataclasses.field(default_factory=TemporaryCache)
    timings: Timings = dataclasses.field(default_factory=Timings)

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.timings.phase(name)

    @contextlib.contextmanager
    def artifact(self, kind: str, parts: Mapping[str, Any], build: Callable[[Path], None]) -> Iterator[Path]:
        """The cache's folder for ``kind``, noted as cached or built."""
        hits = len(self.cache.hits)
        with self.cache.folder(kind, parts, build) as folder:
            self.timings.artifacts.setdefault(kind, "cached" if len(self.cache.hits) > hits else "built")
            yield folder


@dataclasses.dataclass
class FileSource:
    """A file made anywhere, with the checkpoint that describes it (its config says which output is final)."""

    path: Path
    format: str
    checkpoint: Checkpoint


Source = Checkpoint | FileSource


class RecordView:
    """What a registered runner and an opened one both answer from their record."""

    record: RunnerRecord

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.record.precisions

    def availability(self) -> str | None:
        return self.record.availability()


class Runner(RecordView):
    """One runner opened on one source. ``activate`` and ``deactivate`` bracket each ``infer`` (a subclass may load
    a session in one and drop it in the other); ``infer`` returns the features at a precision."""

    def __init__(self, record: RunnerRecord, source: Source, context: RunContext | None = None) -> None:
        self.record = record
        self.source = source
        self.context = context or RunContext()

    @property
    def label(self) -> str:
        """How a check names this runner to the user."""
        return (self.record.file_label if self.file is not None else "") or self.record.description

    @property
    def phases(self) -> dict[str, float]:
        return self.context.timings.phases

    @property
    def artifacts(self) -> dict[str, str]:
        return self.context.timings.artifacts

    @property
    def checkpoint(self) -> Checkpoint:
        return self.source.checkpoint if isinstance(self.source, FileSource) else self.source

    @property
    def file(self) -> FileSource | None:
        return self.source if isinstance(self.source, FileSource) else None

    def activate(self) -> None:
        pass

    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def deactivate(self) -> None:
        pass


FeatureFunction = Callable[[Checkpoint, np.ndarray, str], Mapping[str, np.ndarray]]


class FunctionRunner(Runner):
    """A runner given as a function of (checkpoint, images, precision): custom runtimes, the traps, test doubles."""

    def __init__(self, record: RunnerRecord, source: Source, function: FeatureFunction,
                 context: RunContext | None = None) -> None:
        super().__init__(record, source, context)
        self.function = function

    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        return dict(self.function(self.checkpoint, images, precision))
