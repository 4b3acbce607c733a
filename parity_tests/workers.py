"""Runtimes run side by side, in worker processes, while the parent computes the float64 referee.

A parity run on every runtime is mostly exports and framework imports, each bound to one core; on a machine with
two or more cores they overlap. The parent hands the checkpoint over as a canonical file (bit-exact, with the
checkpoint's digest, so the workers key the parity cache exactly as the parent would) and the images as a
``.npy``; each worker takes whole groups of runtimes from a queue: runtimes that share an export or a framework
(onnxruntime and OpenVINO read one ONNX graph; TensorFlow and LiteRT one TensorFlow import) stay in one process,
so nothing is built twice. A worker only produces features; the parent judges them, exactly as it judges a
runtime run in its own process. A worker that dies (killed, out of memory) fails its runtimes with the cause;
the others carry on.

Workers start with ``OMP_WAIT_POLICY=PASSIVE`` unless the caller set it: OpenMP threads that spin while they wait
cost the other workers their cores. The number of workers is :func:`plan_jobs`'s: the cores this process may run
on, the groups there are, and what memory allows (a worker holding a model and building its export peaks near
:data:`PEAK_BYTES_PER_WEIGHT_BYTE` times the weights: LiteRT's converter at huge, 20.7 GB for 2.6 GB of weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.runners import registry

# The worker groups (a runner record's ``worker``: runtimes that share an export or a framework import run one after
# another in one worker), by what a cold run costs (measured at tiny, docs/benchmarks.md "Parity speed"), dearest
# first: the longest group starts first.
GROUP_ORDER = ("executorch", "tensorflow", "onnx-export", "flax", "transformers-tf", "transformers-pt", "timm",
               "torch")
PEAK_BYTES_PER_WEIGHT_BYTE = 8
# What a worker costs before it loads a model (an interpreter with torch or TensorFlow imported).
WORKER_BASE_BYTES = 1_500_000_000
ENV_JOBS = "CONVNEXTV2_PARITY_JOBS"


@dataclasses.dataclass
class Task:
    name: str
    dtype: str


@dataclasses.dataclass
class Outcome:
    """What a worker reports for one task: the runtime's status and timings, its features in a file."""

    name: str
    dtype: str
    status: str  # produced | unavailable | error
    reason: str = ""
    seconds: float = 0.0
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)
    features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def groups_of(names: Sequence[str]) -> list[list[str]]:
    """``names`` in worker groups, dearest group first; a name the registry does not know is a group of its own."""
    remaining = list(dict.fromkeys(names))
    groups = []
    for group in GROUP_ORDER:
        members = [n for n in registry.names() if n in remaining and registry.REGISTRY[n].record.worker == group]
        if members:
            groups.append(members)
            remaining = [n for n in remaining if n not in members]
    return groups + [[n] for n in remaining]


# transformers' framework switches. This process may have set them for its own imports (the PyTorch peer sets
# USE_TF=0 to keep TensorFlow out); a worker's runners choose their frameworks themselves (transformers-tf needs
# TensorFlow on), so a worker does not inherit them.
_FRAMEWORK_SWITCHES = ("USE_TF", "USE_TORCH", "USE_FLAX")


def passive_openmp(environ: Any = os.environ) -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the caller set it, before any framework loads OpenMP (it reads it once):
    OpenMP threads that spin while they wait take the cores the other workers (and the referee) run on
    (measured: atto cold 107 s spinning)."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def plan_jobs(requested: int | None, groups: int, weight_bytes: int) -> int:
    """How many workers to run: ``requested`` (``--jobs``, or ``$CONVNEXTV2_PARITY_JOBS``) when given, else one
    per core, never more than there are groups, and no more than memory holds. 1 runs every runtime in this
    process, one after another."""
    if requested is None:
        env = os.environ.get(ENV_JOBS, "").strip()
        requested = int(env) if env.isdigit() and int(env) > 0 else None
    jobs = requested if requested is not None else available_cores()
    if requested is None:
        memory = available_memory()
        if memory is not None:
            per_worker = WORKER_BASE_BYTES + PEAK_BYTES_PER_WEIGHT_BYTE * weight_bytes
            # The parent holds the checkpoint and the referee's float64 model meanwhile.
            jobs = min(jobs, max(1, (memory - 3 * weight_bytes) // per_worker))
    return max(1, min(jobs, groups))


@contextlib.contextmanager
def hand_off(ckpt: Checkpoint, images: np.ndarray) -> Iterator[Path]:
    """A folder with the checkpoint as a canonical file and the images, for workers; removed afterwards."""
    from convnextv2 import converters

    work = Path(tempfile.mkdtemp(prefix="convnextv2-parity-workers-"))
    try:
        converters.save(ckpt, work / "model.safetensors", format="canonical")
        np.save(work / "images.npy", np.ascontiguousarray(images))
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Pool:
    """``jobs`` worker processes draining a queue of runtime groups. :meth:`start` returns at once (the parent
    computes the referee meanwhile); :meth:`results` waits for every task."""

    def __init__(self, work: Path, digest: str, cache_root: Path | None, cache_persistent: bool,
                 groups: list[list[Task]], jobs: int, say: Callable[[str], None]) -> None:
        self.work = work
        self.init = {"digest": digest, "cache_root": str(cache_root) if cache_root is not None else None,
                     "cache_persistent": cache_persistent}
        self.groups: queue.Queue[list[Task]] = queue.Queue()
        for group in groups:
            self.groups.put(group)
        self.jobs = jobs
        self.say = say
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.cache_reports: list[dict[str, Any]] = []
        self._threads: list[threading.Thread] = []
        self._processes: list[subprocess.Popen[str]] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        for index in range(self.jobs):
            thread = threading.Thread(target=self._drive, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def results(self) -> dict[tuple[str, str], Outcome]:
        for thread in self._threads:
            thread.join()
        return self.outcomes

    def stop(self) -> None:
        """Kill whatever still runs (the parent was interrupted or failed)."""
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            if process.poll() is None:
                process.kill()
        for thread in self._threads:
            thread.join(timeout=10)

    def _spawn(self, index: int) -> subprocess.Popen[str]:
        env = {key: value for key, value in os.environ.items() if key not in _FRAMEWORK_SWITCHES}
        passive_openmp(env)
        log = open(self.work / f"worker-{index}.log", "w", encoding="utf-8")  # noqa: SIM115  (owned by the child)
        code = "from convnextv2.parity_tests.workers import worker_main; worker_main()"
        try:
            process = subprocess.Popen([sys.executable, "-c", code, str(self.work)], env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        finally:
            log.close()
        with self._lock:
            self._processes.append(process)
        assert process.stdin is not None
        process.stdin.write(json.dumps(self.init) + "\n")
        process.stdin.flush()
        return process

    def _drive(self, index: int) -> None:
        process: subprocess.Popen[str] | None = None
        try:
            while True:
                try:
                    group = self.groups.get_nowait()
                except queue.Empty:
                    break
                for task in group:
                    if process is None or process.poll() is not None:
                        process = self._spawn(index)
                    self.say(f"running {task.name} ({task.dtype}) in worker {index + 1}")
                    self._record(self._ask(process, index, task))
        finally:
            if process is not None and process.poll() is None:
                assert process.stdin is not None
                with contextlib.suppress(OSError):
                    process.stdin.close()  # end of tasks: the worker reports its cache and exits
                assert process.stdout is not None
                with contextlib.suppress(OSError, ValueError):
                    for line in process.stdout:
                        message = json.loads(line)
                        if "cache" in message:
                            with self._lock:
                                self.cache_reports.append(message["cache"])
                process.wait()

    def _ask(self, process: subprocess.Popen[str], index: int, task: Task) -> Outcome:
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps(dataclasses.asdict(task)) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except OSError:
            line = ""
        if not line:
            return Outcome(task.name, task.dtype, "error", self._death(process, index))
        message = json.loads(line)
        outcome = Outcome(**{k: v for k, v in message.items() if k != "features_file"})
        if message.get("features_file"):
            path = self.work / message["features_file"]
            with np.load(path) as data:
                outcome.features = {key: data[key] for key in data.files}
            path.unlink()
        return outcome

    def _death(self, process: subprocess.Popen[str], index: int) -> str:
        code = process.wait()
        cause = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        lines = (self.work / f"worker-{index}.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        tail = next((line for line in reversed(lines) if line.strip()), "")
        return f"its worker process died ({cause}){': ' + tail if tail else ''}"

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes[(outcome.name, outcome.dtype)] = outcome


def worker_main() -> None:
    """A worker: reads its setup, then one task per line on stdin; answers one JSON line per task on its own
    channel (the original stdout; libraries that print go to stderr, the worker's log)."""
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    started = time.perf_counter()
    from convnextv2 import converters
    from convnextv2.converters.runners import RunContext, Timings
    from convnextv2.parity_tests.cache import ParityCache
    from convnextv2.reference.parity_rule import attempt

    work = Path(sys.argv[1])
    init = json.loads(sys.stdin.readline())
    root = Path(init["cache_root"]) if init["cache_root"] else None
    cache = ParityCache.attach(root, persistent=init["cache_persistent"])
    ckpt = converters.load(work / "model.safetensors", format="canonical")
    cache.adopt_digest(ckpt, init["digest"])
    images = np.load(work / "images.npy")
    startup = time.perf_counter() - started
    for count, line in enumerate(sys.stdin):
        task = Task(**json.loads(line))
        runner = registry.get(task.name).open(ckpt, RunContext(cache, Timings()))
        result, produced = attempt(runner, images, task.dtype)
        if count == 0:
            result.phases = {"worker start": startup, **result.phases}
        features_file = None
        if produced is not None:
            features_file = f"features-{os.getpid()}-{count}.npz"
            np.savez(work / features_file, **produced)  # type: ignore[arg-type]
        status = "produced" if produced is not None else result.status
        channel.write(json.dumps({"name": task.name, "dtype": task.dtype, "status": status, "reason": result.reason,
                                  "seconds": result.seconds, "phases": result.phases,
                                  "artifacts": result.artifacts, "features_file": features_file}) + "\n")
        channel.flush()
    channel.write(json.dumps({"cache": cache.summary()}) + "\n")
    channel.flush()
