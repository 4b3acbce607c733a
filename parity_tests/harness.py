"""The parity harness: run one checkpoint on several runtimes, on the same inputs, and compare every runtime,
stage by stage, with a float64 PyTorch referee.

The inputs, the metric, the referee, the baseline, the tolerance and the verdict are the one parity rule,
``convnextv2.reference.parity_rule`` (stated, with the measurements behind its numbers, in docs/parity.md
"Tolerance"). This module runs it over several runtimes and reports. ``atol``/``rtol`` replace the derived
tolerance: pass when max|runtime - referee| <= atol + rtol * max|referee|. The first failing feature in forward
order is where the runtime diverges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.parity_tests import runtimes as runtime_registry
from convnextv2.parity_tests.cache import ParityCache, RuntimeRecord, images_digest
from convnextv2.parity_tests.cache import active as artifacts_active
from convnextv2.parity_tests.inputs import check_image_size, image_files, load_images
from convnextv2.parity_tests.runtimes import Runtime
from convnextv2.parity_tests.workers import Outcome, Pool, Task, groups_of, hand_off, plan_jobs
from convnextv2.reference import parity_rule as rule
from convnextv2.reference.errors import BadInputError, MissingDependencyError, PrecisionUnavailableError

FEATURES = rule.FEATURES
# The precisions the harness runs runtimes at. A reduced-precision run (bfloat16, float16) is judged against the
# PyTorch reference at that precision (its norms in float32: parity_rule.baseline_features); a runtime that
# cannot run a precision is listed as not available at it.
DTYPES = rule.PRECISIONS
REPORT_SCHEMA = "convnextv2-parity-report"
REPORT_SCHEMA_VERSION = "1"


@dataclasses.dataclass
class Tolerance:
    """How pass/fail is decided for one dtype: the derived rule, or explicit atol/rtol."""

    dtype: str
    atol: float | None = None
    rtol: float | None = None

    @property
    def explicit(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def threshold(self, baseline_scale_aware: float, scale: float) -> float:
        """The largest allowed max-abs error for a feature whose referee's largest |value| is ``scale``."""
        if self.explicit:
            return (self.atol or 0.0) + (self.rtol or 0.0) * scale
        return rule.tolerance(baseline_scale_aware, self.dtype) * scale

    def describe(self) -> str:
        if self.explicit:
            return f"atol {self.atol or 0.0:g} + rtol {self.rtol or 0.0:g} x max|referee|"
        return rule.describe(self.dtype)


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
class FeatureResult:
    name: str
    status: str  # pass | fail | not-exposed
    shape: list[int] | None = None
    max_abs_error: float | None = None
    referee_max_abs: float | None = None
    scale_aware_error: float | None = None
    cosine_similarity: float | None = None
    tolerance_abs: float | None = None
    tolerance_scale_aware: float | None = None
    top1_agreement: float | None = None
    top5_overlap: float | None = None
    message: str = ""


@dataclasses.dataclass
class RuntimeResult:
    name: str
    kind: str
    dtype: str
    status: str  # pass | fail | error | unavailable
    reason: str = ""
    first_divergence: str | None = None
    seconds: float = 0.0
    features: list[FeatureResult] = dataclasses.field(default_factory=list)
    # Where the seconds went (import, export, build, compile, forward) and each export cached or built.
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)

    def feature(self, name: str) -> FeatureResult | None:
        return next((f for f in self.features if f.name == name), None)


@dataclasses.dataclass
class ParityReport:
    checkpoint: dict[str, Any]
    inputs: dict[str, Any]
    referee: dict[str, Any]
    baseline: dict[str, Any]
    tolerance: dict[str, Any]
    runtimes: list[RuntimeResult]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    cache: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return all(r.status in ("pass", "unavailable") for r in self.runtimes) and any(
            r.status == "pass" for r in self.runtimes)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def result(self, name: str, dtype: str = "float32") -> RuntimeResult:
        for r in self.runtimes:
            if r.name == name and r.dtype == dtype:
                return r
        raise KeyError(f"{name} ({dtype}) is not in this report")

    def failures(self) -> list[RuntimeResult]:
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
            "runtimes": [
                {**{k: v for k, v in dataclasses.asdict(r).items() if k != "features"},
                 "features": [dataclasses.asdict(f) for f in r.features]}
                for r in self.runtimes
            ],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            **({"cache": self.cache} if self.cache is not None else {}),
        }


# ------------------------------------------------------------------ metrics

def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Worst per-image cosine similarity of the flattened features."""
    a2 = a.reshape(a.shape[0], -1)
    b2 = b.reshape(b.shape[0], -1)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    dots = np.einsum("ij,ij->i", a2, b2)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(np.all(a2 == b2, axis=1), 1.0, 0.0))
    return float(cos.min())


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def compare_feature(name: str, value: np.ndarray | None, referee: np.ndarray, baseline_scale_aware: float,
                    tolerance: Tolerance) -> FeatureResult:
    if value is None:
        return FeatureResult(name, "not-exposed", message="this runtime does not expose it")
    value = np.asarray(value)
    if value.shape != referee.shape:
        return FeatureResult(name, "fail", shape=list(value.shape),
                             message=f"shape {tuple(value.shape)}, referee {tuple(referee.shape)}")
    actual = value.astype(np.float64)
    if not np.all(np.isfinite(actual)):
        return FeatureResult(name, "fail", shape=list(value.shape), message="non-finite values")
    threshold = tolerance.threshold(baseline_scale_aware, rule.feature_scale(referee))
    judged = rule.verdict(name, actual, referee, threshold)
    scale = judged.referee_max_abs
    result = FeatureResult(
        name, "pass" if judged.passed else "fail", shape=list(value.shape), max_abs_error=judged.max_abs_error,
        referee_max_abs=scale, scale_aware_error=judged.scale_aware_error, cosine_similarity=_cosine(actual, referee),
        tolerance_abs=threshold, tolerance_scale_aware=threshold / scale if scale > 0 else threshold,
        message=judged.message)
    if judged.top1_same is not None:
        ours, theirs = _top_k(actual, 5), _top_k(referee, 5)
        result.top1_agreement = float(judged.top1_same.mean())
        result.top5_overlap = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ours, theirs, strict=True)]))
    return result


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


def resolve_runtimes(names: Iterable[str | Runtime]) -> list[Runtime]:
    resolved = []
    for item in names:
        resolved.append(item if isinstance(item, Runtime) else runtime_registry.get(item))
    return resolved


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


def run_parity(
    ckpt: Checkpoint,
    runtimes: Sequence[str | Runtime],
    *,
    dtypes: Sequence[str] = ("float32",),
    images: np.ndarray | None = None,
    inputs_info: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    batch: int = rule.DEFAULT_BATCH,
    seed: int = rule.DEFAULT_SEED,
    images_dir: Path | None = None,
    atol: Mapping[str, float] | None = None,
    rtol: Mapping[str, float] | None = None,
    referee_ckpt: Checkpoint | None = None,
    referee_features: Mapping[str, np.ndarray] | None = None,
    baseline_features: Mapping[str, np.ndarray] | None = None,
    checkpoint_path: str | None = None,
    referee_source: str | None = None,
    progress: Any = None,
    cache: ParityCache | None = None,
    jobs: int | None = None,
) -> ParityReport:
    """Compare ``runtimes`` on ``ckpt`` against the float64 PyTorch referee.

    ``referee_ckpt`` lets a caller build the referee from an independent copy of the weights (the matrix
    builds it from the in-memory fixture, so a converter bug in the file under test cannot hide by
    appearing on both sides). ``referee_features``/``baseline_features`` reuse earlier float64/float32
    PyTorch runs on the same images. ``cache`` (parity_tests/cache.py) keeps the exports and the
    referee's features for the next run; without it they are shared within this run only. ``jobs`` worker
    processes run the runtimes side by side (parity_tests/workers.py; default: one per core, as memory allows;
    1: every runtime in this process).
    """
    own_cache = cache is None
    cache = cache or ParityCache(None)
    try:
        return _run_parity(ckpt, runtimes, dtypes, images, inputs_info, image_size, batch, seed, images_dir, atol,
                           rtol, referee_ckpt, referee_features, baseline_features, checkpoint_path, referee_source,
                           progress, cache, jobs)
    finally:
        if own_cache:
            cache.close()


def _run_parity(ckpt: Checkpoint, runtimes: Sequence[str | Runtime], dtypes: Sequence[str],
                images: np.ndarray | None, inputs_info: Mapping[str, Any] | None, image_size: int | None, batch: int,
                seed: int, images_dir: Path | None, atol: Mapping[str, float] | None,
                rtol: Mapping[str, float] | None, referee_ckpt: Checkpoint | None,
                referee_features: Mapping[str, np.ndarray] | None, baseline_features: Mapping[str, np.ndarray] | None,
                checkpoint_path: str | None, referee_source: str | None, progress: Any,
                cache: ParityCache, jobs: int | None) -> ParityReport:
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    resolved = resolve_runtimes(runtimes)
    if images is None:
        images, info = make_inputs(ckpt, image_size=image_size, batch=batch, seed=seed, images_dir=images_dir)
    else:
        info = dict(inputs_info or {"kind": "given", "batch": int(images.shape[0]), "image_size": int(images.shape[-1]),
                                    "seed": None, "directory": None, "files": [], "preprocessing": None})
    source = referee_ckpt or ckpt
    say = progress or (lambda message: None)
    timings: dict[str, float] = {}
    def reference_run(dtype: str) -> dict[str, np.ndarray]:
        # The PyTorch reference on these weights and images: computed once, then taken from the cache.
        start = time.perf_counter()
        parts = {"checkpoint": cache.digest(source), "images": images_digest(images), "dtype": dtype}
        try:
            return cache.arrays("torch-features", parts, lambda: torch_features(source, images, dtype))
        finally:
            timings[f"torch {dtype}"] = timings.get(f"torch {dtype}", 0.0) + time.perf_counter() - start

    # Runtimes from the registry go to worker processes when there is more than one group of them and more than
    # one core: they start now, and the referee below is computed while they run.
    delegated = [(runtime, dtype) for runtime in resolved for dtype in dtypes
                 if runtime_registry.RUNTIMES.get(runtime.name) is runtime and runtime.availability() is None
                 and dtype in runtime.dtypes]
    by_name: dict[str, list[Task]] = {}
    for runtime, dtype in delegated:
        by_name.setdefault(runtime.name, []).append(Task(runtime.name, dtype))
    groups = [[task for name in group for task in by_name[name]] for group in groups_of(list(by_name))]
    pool: Pool | None = None
    with contextlib.ExitStack() as stack:
        planned = plan_jobs(jobs, len(groups), sum(a.nbytes for _, a in ckpt.ordered_tensors())) if groups else 1
        if len(groups) > 1 and planned > 1:
            started = time.perf_counter()
            work = stack.enter_context(hand_off(ckpt, images))
            timings["hand-off"] = time.perf_counter() - started
            pool = Pool(work, cache.digest(ckpt), cache.root if cache.enabled else None, cache.persistent, groups,
                        planned, say)
            stack.callback(pool.stop)
            pool.start()
        if referee_features is None:
            say("referee: torch float64")
            referee_features = reference_run("float64")
        if baseline_features is None:
            say("baseline: torch float32")
            baseline_features = reference_run("float32")
        referee = {k: np.asarray(v, dtype=np.float64) for k, v in referee_features.items()}
        features = [name for name in FEATURES if name in referee]
        baseline = {name: rule.scale_aware_error(baseline_features[name], referee[name]) for name in features}
        tolerances = {d: Tolerance(d, (atol or {}).get(d), (rtol or {}).get(d)) for d in DTYPES}
        baselines = {d: baseline for d in rule.FULL_PRECISIONS}
        for dtype in dtypes:
            if dtype in rule.REDUCED_PRECISIONS and dtype not in baselines:
                say(f"baseline: torch {dtype} (norms in float32)")
                reduced = reference_run(dtype)
                baselines[dtype] = {name: rule.scale_aware_error(reduced[name], referee[name]) for name in features}

        outcomes: dict[tuple[str, str], Outcome] = {}
        if pool is not None:
            waiting = time.perf_counter()
            outcomes = pool.results()
            timings["waiting for workers"] = time.perf_counter() - waiting
            for report in pool.cache_reports:
                cache.merge(report)
        results: list[RuntimeResult] = []
        for runtime in resolved:
            for dtype in dtypes:
                outcome = outcomes.get((runtime.name, dtype))
                if outcome is None:
                    result, produced = produce(runtime, dtype, ckpt, images, cache, say)
                else:
                    result = RuntimeResult(runtime.name, runtime.kind, dtype, outcome.status, outcome.reason,
                                           seconds=outcome.seconds, phases=outcome.phases, artifacts=outcome.artifacts)
                    produced = outcome.features if outcome.status == "produced" else None
                    if produced is None:
                        say(result.reason)
                if produced is not None:
                    judge(result, produced, referee, features, baselines[dtype], tolerances[dtype])
                results.append(result)

        return ParityReport(
            checkpoint=_checkpoint_info(ckpt, checkpoint_path),
            inputs=info,
            referee={"runtime": "torch", "dtype": "float64",
                     "built_from": referee_source or ("an independent copy of the weights" if source is not ckpt
                                                      else "the checkpoint under test")},
            baseline={"runtime": "torch", "dtype": "float32", "scale_aware_error": baseline,
                      **({"reduced": {d: {"dtype": d, "norms": "float32", "scale_aware_error": baselines[d]}
                                      for d in rule.REDUCED_PRECISIONS if d in baselines}}
                         if any(d in baselines for d in rule.REDUCED_PRECISIONS) else {})},
            tolerance={d: {"rule": "explicit" if t.explicit else "derived", "description": t.describe(),
                           "atol": t.atol, "rtol": t.rtol, "factor": rule.FACTOR, "floor": rule.FLOOR[d]}
                       for d, t in tolerances.items() if d in dtypes},
            runtimes=results,
            timings=timings,
            cache=cache.summary(),
        )


def produce(runtime: Runtime, dtype: str, ckpt: Checkpoint, images: np.ndarray, cache: ParityCache,
            say: Any = None) -> tuple[RuntimeResult, dict[str, np.ndarray] | None]:
    """Run one runtime: its result so far (unavailable and error are final) and its features, or None."""
    say = say or (lambda message: None)
    result = RuntimeResult(runtime.name, runtime.kind, dtype, "pass")
    reason = runtime.availability()
    if reason is not None:
        result.status, result.reason = "unavailable", f"runtime {runtime.name} is not available: {reason}"
        say(result.reason)
        return result, None
    if dtype not in runtime.dtypes:
        # Not a failure: the runtime has no way to run this precision (say, Flax in float16).
        result.status = "unavailable"
        result.reason = f"runtime {runtime.name} is not available at {dtype} (it runs {', '.join(runtime.dtypes)})"
        say(result.reason)
        return result, None
    say(f"running {runtime.name} ({dtype})")
    start = time.perf_counter()
    record = RuntimeRecord(cache, result.phases, result.artifacts)
    try:
        with artifacts_active(record):
            produced = runtime.features(ckpt, images, dtype)
    except PrecisionUnavailableError as exc:
        result.status, result.reason = "unavailable", f"runtime {runtime.name} is not available at {dtype} here: {exc}"
        say(result.reason)
        return result, None
    except MissingDependencyError as exc:
        result.status, result.reason = "unavailable", f"runtime {runtime.name} is not available: {exc}"
        return result, None
    except Exception as exc:  # a runtime that crashes or refuses a valid checkpoint fails parity, with the cause
        result.status = "error"
        result.reason = f"{type(exc).__name__}: {exc}"
        result.seconds = time.perf_counter() - start
        say("".join(traceback.format_exception_only(type(exc), exc)).strip())
        return result, None
    result.seconds = time.perf_counter() - start
    return result, dict(produced)


def judge(result: RuntimeResult, produced: Mapping[str, np.ndarray], referee: dict[str, np.ndarray],
          features: list[str], baseline: dict[str, float], tolerance: Tolerance) -> None:
    """The parity rule on a runtime's features, feature by feature, into ``result``."""
    result.status = "pass"
    # How the runtime actually ran (e.g. the precision OpenVINO reports), shown as the row's note.
    detail = produced.get(runtime_registry.DETAIL_KEY)
    if detail is not None:
        result.reason = str(np.asarray(detail))
    for name in features:
        value = produced.get(name)
        result.features.append(compare_feature(name, value, referee[name], baseline[name], tolerance))
    failed = [f.name for f in result.features if f.status == "fail"]
    if failed:
        result.status = "fail"
        result.first_divergence = failed[0]
    elif not any(f.status == "pass" for f in result.features):
        result.status, result.reason = "error", "the runtime exposed none of the compared features"
