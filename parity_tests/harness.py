"""The parity harness: run one checkpoint on several runtimes, on the same inputs, and compare every runtime,
stage by stage, with a float64 PyTorch referee.

The inputs, the metric, the referee, the baseline, the tolerance and the check are the one parity rule,
``convnextv2.reference.parity_rule`` (stated, with the measurements behind its numbers, in docs/parity.md
"Tolerance"). This module runs it over several runtimes and reports. ``atol``/``rtol`` replace the derived
tolerance: pass when max|runtime - referee| <= atol + rtol * max|referee|. The first failing feature in forward
order is where the runtime diverges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.runners import registry
from convnextv2.converters.runners.base import RunContext, Timings
from convnextv2.parity_tests import runtimes as runtime_registry
from convnextv2.parity_tests.cache import ParityCache, images_digest
from convnextv2.parity_tests.inputs import check_image_size, image_files, load_images
from convnextv2.parity_tests.runtimes import Runtime
from convnextv2.parity_tests.workers import Outcome, Pool, Task, groups_of, hand_off, plan_jobs
from convnextv2.reference import parity_rule as rule
from convnextv2.reference.errors import BadInputError
from convnextv2.reference.parity_rule import FeatureResult, Tolerance, Verdict

FEATURES = rule.FEATURES
# The precisions the harness runs runtimes at. A reduced-precision run (bfloat16, float16) is judged against the
# PyTorch reference at that precision (its norms in float32: parity_rule.baseline_features); a runtime that
# cannot run a precision is listed as not available at it.
DTYPES = rule.PRECISIONS
REPORT_SCHEMA = "convnextv2-parity-report"
REPORT_SCHEMA_VERSION = "1"
ARTIFACT_KIND = "artifact"
__all__ = ["DTYPES", "FEATURES", "Artifacts", "FeatureResult", "ParityReport", "ParityRequest", "Verdict",
           "Tolerance", "parse_tolerances", "run_parity"]


def parse_tolerances(values: Sequence[str], option: str) -> dict[str, float]:
    """``["1e-5"]`` -> every dtype; ``["float64=1e-12", "1e-5"]`` -> per dtype, unqualified for the rest."""
    result: dict[str, float] = {}
    default: float | None = None
    for text in values:
        dtype, sep, number = text.partition("=")
        try:
            value = float(number if sep else dtype)
        except ValueError:
            raise BadInputError(f"{option} {text!r}: expected a number or DTYPE=NUMBER") from None
        if value < 0 or not np.isfinite(value):
            raise BadInputError(f"{option} {text!r}: must be a finite number >= 0")
        if sep:
            if dtype not in DTYPES:
                raise BadInputError(f"{option} {text!r}: dtype must be one of {', '.join(DTYPES)}")
            result[dtype] = value
        else:
            default = value
    if default is not None:
        for dtype in DTYPES:
            result.setdefault(dtype, default)
    return result


@dataclasses.dataclass
class ParityReport:
    checkpoint: dict[str, Any]
    inputs: dict[str, Any]
    referee: dict[str, Any]
    baseline: dict[str, Any]
    tolerance: dict[str, Any]
    runtimes: list[Verdict]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    cache: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        # A runtime that cannot run here is listed, not failed; an artifact the user handed in that cannot be
        # run here was not checked, so it never counts as a pass.
        return all(r.status == "pass" if r.kind == ARTIFACT_KIND else r.status in ("pass", "unavailable")
                   for r in self.runtimes) and any(r.status == "pass" for r in self.runtimes)

    @property
    def artifacts(self) -> list[Verdict]:
        return [r for r in self.runtimes if r.kind == ARTIFACT_KIND]

    def unchecked(self) -> list[Verdict]:
        """Artifacts that could not be run here (each says why)."""
        return [r for r in self.artifacts if r.status == "unavailable"]

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def result(self, name: str, dtype: str = "float32") -> Verdict:
        for r in self.runtimes:
            if r.name == name and r.dtype == dtype:
                return r
        raise KeyError(f"{name} ({dtype}) is not in this report")

    def failures(self) -> list[Verdict]:
        return [r for r in self.runtimes if r.status in ("fail", "error")]

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "schema_version": REPORT_SCHEMA_VERSION,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "checkpoint": self.checkpoint,
            "inputs": self.inputs,
            "referee": self.referee,
            "baseline": self.baseline,
            "tolerance": self.tolerance,
            "features": list(FEATURES),
            "runtimes": [r.to_json_dict() for r in self.runtimes],
            "artifacts": [artifact_entry(r) for r in self.artifacts],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            **({"cache": self.cache} if self.cache is not None else {}),
        }


def artifact_entry(result: Verdict) -> dict[str, Any]:
    """An artifact's entry of the JSON report: what its runner found (path, format, runtime, precision,
    conventions, first divergence, metrics) and the verdict's status and reason."""
    entry = dict(result.artifact or {})
    entry.update(status=result.status, reason=result.reason, row=result.name)
    entry.setdefault("first_divergence", None)
    entry.setdefault("metrics", None)
    return entry


# ------------------------------------------------------------------ inputs and the run

def make_inputs(ckpt: Checkpoint, *, image_size: int | None = None, batch: int = rule.DEFAULT_BATCH,
                seed: int = rule.DEFAULT_SEED,
                images_dir: Path | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    size = image_size or ckpt.preprocessing.input_size
    check_image_size(size)
    if images_dir is not None:
        files = image_files(Path(images_dir))
        images = load_images(files, ckpt.preprocessing, size)
        info = {"kind": "files", "directory": str(images_dir), "files": [p.name for p in files],
                "batch": len(files), "image_size": size, "seed": None,
                "preprocessing": ckpt.preprocessing.to_json_dict()}
        return images, info
    images = rule.seeded_images(batch, size, seed)
    return images, {"kind": "random", "directory": None, "files": [], "batch": batch, "image_size": size,
                    "seed": seed, "preprocessing": None}


def torch_features(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """The PyTorch reference's features: the float64 referee or the float32 baseline (the rule's)."""
    if dtype == "float64":
        return rule.referee_features(ckpt, images)
    return rule.baseline_features(ckpt, images, dtype)


def resolve_runtimes(names: Iterable[str | Runtime | registry.Entry]) -> list[Runtime | registry.Entry]:
    return [item if not isinstance(item, str) else runtime_registry.get(item) for item in names]


def _checkpoint_info(ckpt: Checkpoint, path: str | None) -> dict[str, Any]:
    # Identity (the file checked, as it is now) apart from provenance (what it was converted from).
    own = ckpt.file
    source = {"format": ckpt.source.format, "file_name": ckpt.source.file_name, "sha256": ckpt.source.sha256 or None}
    return {"path": path, "format": own.format if own else ckpt.source.format,
            "layout": ckpt.source.layout.get("layout") if own is None or own.format == ckpt.source.format else None,
            "file_name": own.file_name if own else ckpt.source.file_name, "sha256": own.sha256 if own else None,
            "source": source,
            "variant": ckpt.config.variant, "depths": list(ckpt.config.depths), "dims": list(ckpt.config.dims),
            "num_classes": ckpt.config.num_classes, "head_norm": ckpt.config.head_norm,
            "head_norm_eps": ckpt.config.head_norm_eps}



# ------------------------------------------------------------------ the request

@dataclasses.dataclass
class Inputs:
    """The images: given (with what to report of them), or made from a folder of files or from a seed."""

    images: np.ndarray | None = None
    info: Mapping[str, Any] | None = None
    image_size: int | None = None
    batch: int = rule.DEFAULT_BATCH
    seed: int = rule.DEFAULT_SEED
    images_dir: Path | None = None


@dataclasses.dataclass
class Tolerances:
    """Explicit atol/rtol per precision (parse_tolerances); none: the derived rule."""

    atol: Mapping[str, float] | None = None
    rtol: Mapping[str, float] | None = None

    def at(self, dtype: str) -> Tolerance:
        return Tolerance(dtype, (self.atol or {}).get(dtype), (self.rtol or {}).get(dtype))


@dataclasses.dataclass
class RefereeSource:
    """Where the referee comes from: an independent copy of the weights (the matrix builds it from the in-memory
    fixture, so a converter bug in the file under test cannot hide by appearing on both sides), or earlier
    float64/float32 PyTorch runs on the same images; ``label`` says which in the report."""

    checkpoint: Checkpoint | None = None
    features: Mapping[str, np.ndarray] | None = None
    baseline: Mapping[str, np.ndarray] | None = None
    label: str | None = None


@dataclasses.dataclass
class Execution:
    """What runs and how: the runtimes and precisions; ``jobs`` worker processes side by side (workers.py; default
    one per core as memory allows; 1: every runtime in this process, but those that need a process of their own);
    the cache that keeps exports and the referee for the next run (none: shared within this run only)."""

    runtimes: Sequence[str | Runtime | registry.Entry] = ()
    dtypes: Sequence[str] = ("float32",)
    jobs: int | None = None
    cache: ParityCache | None = None
    progress: Callable[[str], None] | None = None


@dataclasses.dataclass
class Artifacts:
    """Deployment files made anywhere (by this toolkit or any other tool), each run in its own runtime and judged
    against the same referee as the runtimes (converters/runners/artifact.py); ``pins`` fixes the conventions
    the runner would otherwise find (an ``artifact.Pins``; none: every convention found)."""

    paths: Sequence[Path | str] = ()
    pins: Any = None


@dataclasses.dataclass
class ParityRequest:
    checkpoint: Checkpoint
    execution: Execution
    inputs: Inputs = dataclasses.field(default_factory=Inputs)
    tolerances: Tolerances = dataclasses.field(default_factory=Tolerances)
    referee: RefereeSource = dataclasses.field(default_factory=RefereeSource)
    checkpoint_path: str | None = None  # as the report names it
    artifacts: Artifacts = dataclasses.field(default_factory=Artifacts)

    _GROUPS = {"inputs": ("images", "inputs_info", "image_size", "batch", "seed", "images_dir"),
               "tolerances": ("atol", "rtol"),
               "referee": ("referee_ckpt", "referee_features", "baseline_features", "referee_source"),
               "execution": ("dtypes", "jobs", "cache", "progress"),
               "artifacts": ("artifacts", "artifact_pins")}

    @classmethod
    def of(cls, ckpt: Checkpoint, runtimes: Sequence[str | Runtime | registry.Entry], **options: Any) -> ParityRequest:
        """A request from flat keyword options (the names ``run_parity`` has always taken)."""
        renamed = {"inputs_info": "info", "referee_ckpt": "checkpoint", "referee_features": "features",
                   "baseline_features": "baseline", "referee_source": "label", "artifacts": "paths",
                   "artifact_pins": "pins"}
        parts: dict[str, dict[str, Any]] = {group: {} for group in cls._GROUPS}
        path = options.pop("checkpoint_path", None)
        for key, value in options.items():
            group = next((g for g, keys in cls._GROUPS.items() if key in keys), None)
            if group is None:
                raise TypeError(f"run_parity() got an unexpected option {key!r}")
            parts[group][renamed.get(key, key)] = value
        return cls(ckpt, Execution(runtimes, **parts["execution"]), Inputs(**parts["inputs"]),
                   Tolerances(**parts["tolerances"]), RefereeSource(**parts["referee"]), path,
                   Artifacts(**parts["artifacts"]))


def run_parity(request: ParityRequest | Checkpoint, runtimes: Sequence[str | Runtime | registry.Entry] = (),
               **options: Any) -> ParityReport:
    """Compare the request's runtimes on its checkpoint against the float64 PyTorch referee. Also callable as
    ``run_parity(ckpt, runtimes, **options)`` with the flat option names of :meth:`ParityRequest.of`."""
    if not isinstance(request, ParityRequest):
        request = ParityRequest.of(request, runtimes, **options)
    cache = request.execution.cache
    own_cache = cache is None
    cache = cache or ParityCache(None)
    try:
        return _Run(request, cache).report()
    finally:
        if own_cache:
            cache.close()


class _Run:
    """One parity run: inputs, referee (while workers run the delegated runtimes), checks, report."""

    def __init__(self, request: ParityRequest, cache: ParityCache) -> None:
        for dtype in request.execution.dtypes:
            if dtype not in DTYPES:
                raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.request, self.cache = request, cache
        self.ckpt = request.checkpoint
        self.dtypes = list(request.execution.dtypes)
        self.resolved = resolve_runtimes(request.execution.runtimes)
        given = request.inputs
        if given.images is None:
            self.images, self.info = make_inputs(self.ckpt, image_size=given.image_size, batch=given.batch,
                                                 seed=given.seed, images_dir=given.images_dir)
        else:
            self.images = given.images
            self.info = dict(given.info or {"kind": "given", "batch": int(given.images.shape[0]),
                                            "image_size": int(given.images.shape[-1]), "seed": None,
                                            "directory": None, "files": [], "preprocessing": None})
        self.source = request.referee.checkpoint or self.ckpt
        self.say = request.execution.progress or (lambda message: None)
        cache.report_to(request.execution.progress)  # a damaged cache entry is reported as it is found
        self.timings: dict[str, float] = {}
        # Each artifact read before any model runs: an unreadable one is bad input, and the precisions they hold
        # decide which reduced-precision baselines the referee needs.
        self.probes = self._probe_artifacts()

    def _probe_artifacts(self) -> list[Any]:
        given = self.request.artifacts
        if not given.paths:
            return []
        from convnextv2.converters.runners import artifact

        start = time.perf_counter()
        probes = [artifact.probe(Path(path), given.pins) for path in given.paths]
        self.timings["artifacts: probe"] = time.perf_counter() - start
        return probes

    def _baseline_dtypes(self) -> list[str]:
        """The reduced precisions judged in this run: those asked of the runtimes and those the artifacts hold."""
        wanted = [*self.dtypes, *(probe.precision for probe in self.probes)]
        return [dtype for dtype in dict.fromkeys(wanted) if dtype in rule.REDUCED_PRECISIONS]

    def reference_run(self, dtype: str) -> dict[str, np.ndarray]:
        """The PyTorch reference on these weights and images: computed once, then taken from the cache."""
        start = time.perf_counter()
        parts = {"checkpoint": self.cache.digest(self.source), "images": images_digest(self.images), "dtype": dtype}
        try:
            return self.cache.arrays("torch-features", parts, lambda: torch_features(self.source, self.images, dtype))
        finally:
            self.timings[f"torch {dtype}"] = self.timings.get(f"torch {dtype}", 0.0) + time.perf_counter() - start

    def referee(self) -> rule.Referee:
        given = self.request.referee
        features = given.features
        if features is None:
            self.say("referee: torch float64")
            features = self.reference_run("float64")
        baseline = given.baseline
        if baseline is None:
            self.say("baseline: torch float32")
            baseline = self.reference_run("float32")
        baselines = {"float32": baseline}
        for dtype in self._baseline_dtypes():
            if dtype not in baselines:
                self.say(f"baseline: torch {dtype} (norms in float32)")
                baselines[dtype] = self.reference_run(dtype)
        return rule.Referee.from_features(self.images, features, baselines)

    def _pool(self, stack: contextlib.ExitStack) -> Pool | None:
        """Registered runtimes go to worker processes when there is more than one group of them and more than one
        core, and a runtime that needs a process of its own always does: they start now, and the referee is
        computed while they run."""
        by_name: dict[str, list[Task]] = {}
        for runtime in self.resolved:
            if runtime_registry.RUNTIMES.get(runtime.name) is runtime and runtime.availability() is None:
                for dtype in self.dtypes:
                    if dtype in runtime.dtypes:
                        by_name.setdefault(runtime.name, []).append(Task(runtime.name, dtype))
        groups = [[task for name in group for task in by_name[name]] for group in groups_of(list(by_name))]
        if not groups:
            return None
        jobs = plan_jobs(self.request.execution.jobs, len(groups), sum(a.nbytes for _, a in self.ckpt.ordered_tensors()))
        if not (len(groups) > 1 and jobs > 1):
            groups = [group for group in groups if any(registry.get(t.name).record.isolated for t in group)]
            jobs = 1
        if not groups:
            return None
        started = time.perf_counter()
        work = stack.enter_context(hand_off(self.ckpt, self.images))
        self.timings["hand-off"] = time.perf_counter() - started
        cache = self.cache
        pool = Pool(work, cache.digest(self.ckpt), cache.root if cache.enabled else None, cache.persistent, groups,
                    jobs, self.say)
        stack.callback(pool.stop)
        pool.start()
        return pool

    def report(self) -> ParityReport:
        with contextlib.ExitStack() as stack:
            pool = self._pool(stack)
            referee = self.referee()
            outcomes: dict[tuple[str, str], Outcome] = {}
            if pool is not None:
                waiting = time.perf_counter()
                outcomes = pool.results()
                self.timings["waiting for workers"] = time.perf_counter() - waiting
                for summary in pool.cache_reports:
                    self.cache.merge(summary)
            results = [self._check(runtime, dtype, outcomes.get((runtime.name, dtype)), referee)
                       for runtime in self.resolved for dtype in self.dtypes]
            results += [self._check_artifact(probe, referee) for probe in self.probes]
        return self._report(referee, results)

    def _check_artifact(self, probe: Any, referee: rule.Referee) -> Verdict:
        from convnextv2.converters.runners import artifact

        explicit = self.request.tolerances.at(probe.precision) if probe.precision in DTYPES else None
        tolerance = explicit if explicit is not None and explicit.explicit else None
        start = time.perf_counter()
        try:
            return artifact.check(probe, self.ckpt, referee, self.request.artifacts.pins, tolerance, self.say)
        finally:
            self.timings[f"artifact {probe.path.name}"] = time.perf_counter() - start

    def _check(self, runtime: Runtime | registry.Entry, dtype: str, outcome: Outcome | None,
               referee: rule.Referee) -> Verdict:
        if outcome is None:
            runner = runtime.open(self.ckpt, RunContext(self.cache, Timings()))
            result, produced = rule.attempt(runner, self.images, dtype, self.say)
        else:
            result = Verdict(runtime.name, runtime.kind, dtype, outcome.status, outcome.reason,
                                   seconds=outcome.seconds, phases=outcome.phases, artifacts=outcome.artifacts)
            produced = outcome.features if outcome.status == "produced" else None
            if produced is None:
                self.say(result.reason)
        if produced is not None:
            rule.assess(result, produced, referee, self.request.tolerances.at(dtype))
        return result

    def _report(self, referee: rule.Referee, results: list[Verdict]) -> ParityReport:
        baselines = referee.baselines
        reduced = {d: {"dtype": d, "norms": "float32", "scale_aware_error": baselines[d]}
                   for d in rule.REDUCED_PRECISIONS if d in baselines}
        label = self.request.referee.label
        return ParityReport(
            checkpoint=_checkpoint_info(self.ckpt, self.request.checkpoint_path),
            inputs=self.info,
            referee={"runtime": "torch", "dtype": "float64",
                     "built_from": label or ("an independent copy of the weights" if self.source is not self.ckpt
                                             else "the checkpoint under test")},
            baseline={"runtime": "torch", "dtype": "float32", "scale_aware_error": baselines["float32"],
                      **({"reduced": reduced} if reduced else {})},
            tolerance={d: {"rule": "explicit" if t.explicit else "derived", "description": t.describe(),
                           "atol": t.atol, "rtol": t.rtol, "factor": rule.FACTOR, "floor": rule.FLOOR[d]}
                       for d, t in ((d, self.request.tolerances.at(d)) for d in DTYPES)
                       if d in self.dtypes or d in self._baseline_dtypes()},
            runtimes=results,
            timings=self.timings,
            cache=self.cache.summary(),
        )
