"""Runtimes in worker processes (parity_tests/workers.py): the same verdicts as one process, the referee computed
beside them, a worker that dies failing only its own runtimes (by name, with the cause), and the number of
workers bounded by cores, groups and memory."""

from __future__ import annotations

import json
import signal
import sys
import textwrap

import pytest

from convnextv2.fixtures import make_checkpoint, write_fixture
from convnextv2.parity_tests import workers
from convnextv2.parity_tests.conftest_helpers import run_cli
from convnextv2.parity_tests.harness import run_parity

pytestmark = [pytest.mark.torch, pytest.mark.flax]
SMALL = "custom:depths=1,1,2,1;dims=8,16,32,64"


def _verdicts(report) -> list[tuple[str, str, list[tuple[str, str]]]]:
    return [(r.name, r.status, [(f.name, f.status) for f in r.features]) for r in report.runtimes]


def test_workers_reach_the_verdicts_of_one_process():
    ckpt = make_checkpoint(SMALL, seed=3, num_classes=10)
    alone = run_parity(ckpt, ["torch", "flax"], image_size=64, batch=2, jobs=1)
    beside = run_parity(ckpt, ["torch", "flax"], image_size=64, batch=2, jobs=2)
    assert alone.passed and beside.passed
    assert _verdicts(beside) == _verdicts(alone)
    # Each runtime ran in a worker (its first task records the worker's start), the checkpoint went over once.
    assert all("worker start" in r.phases for r in beside.runtimes), [r.phases for r in beside.runtimes]
    assert "hand-off" in beside.timings and "hand-off" not in alone.timings
    for a, b in zip(alone.runtimes, beside.runtimes, strict=True):
        for fa, fb in zip(a.features, b.features, strict=True):
            # The same weights and images on the same library: errors of the same size, not merely both passing.
            assert fb.max_abs_error == pytest.approx(fa.max_abs_error, rel=0.5, abs=1e-9), (a.name, fa.name)


def test_a_dead_worker_fails_its_own_runtimes_by_name(monkeypatch):
    ask = workers.Pool._ask

    def kill_for_flax(self, process, index, task):
        if task.name == "flax":
            process.send_signal(signal.SIGKILL)
            process.wait()
        return ask(self, process, index, task)

    monkeypatch.setattr(workers.Pool, "_ask", kill_for_flax)
    report = run_parity(make_checkpoint(SMALL, seed=3, num_classes=10), ["torch", "flax"], image_size=64, batch=2,
                        jobs=2)
    flax = report.result("flax")
    assert flax.status == "error" and "its worker process died (killed by signal 9)" in flax.reason, flax.reason
    assert report.result("torch").status == "pass"
    assert not report.passed and report.exit_code == 1


def test_the_command_line_runs_workers_by_default(tmp_path):
    src = tmp_path / "atto.pt"
    write_fixture(src, "atto", "original", seed=0)
    env = {"CONVNEXTV2_PARITY_JOBS": "", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = run_cli("parity", str(src), "--runtimes", "torch,flax", "--image-size", "64", "--batch", "2", "--json",
                   env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    ran_in_workers = [r["name"] for r in report["runtimes"] if "worker start" in r["phases"]]
    assert ran_in_workers == (["torch", "flax"] if workers.available_cores() > 1 else []), report["timings"]
    # The Flax forward's XLA executables are kept beside the cache's entries for the next run.
    kept = tmp_path / "cache" / "convnextv2" / "jax-compilations"
    assert kept.is_dir() and any(kept.iterdir())
    one = run_cli("parity", str(src), "--runtimes", "torch,flax", "--image-size", "64", "--batch", "2", "--json",
                  "--jobs", "1", env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    assert [r["name"] for r in json.loads(one.stdout)["runtimes"] if "worker start" in r["phases"]] == []
    bad = run_cli("parity", str(src), "--jobs", "0", env=env)
    assert bad.returncode == 2 and "--jobs" in bad.stderr and "Traceback" not in bad.stderr


def test_plan_jobs_is_bounded_by_cores_groups_and_memory(monkeypatch):
    monkeypatch.delenv(workers.ENV_JOBS, raising=False)
    monkeypatch.setattr(workers, "available_cores", lambda: 4)
    monkeypatch.setattr(workers, "available_memory", lambda: 64 * 10**9)
    assert workers.plan_jobs(None, 7, 10**8) == 4
    assert workers.plan_jobs(None, 2, 10**8) == 2  # never more workers than groups
    # Huge (2.6 GB of weights): a worker may need 8x that; 24 GB leaves room for one.
    monkeypatch.setattr(workers, "available_memory", lambda: 24 * 10**9)
    assert workers.plan_jobs(None, 7, 2_600_000_000) == 1
    assert workers.plan_jobs(3, 7, 2_600_000_000) == 3  # asked for by name: the user's call
    monkeypatch.setenv(workers.ENV_JOBS, "2")
    assert workers.plan_jobs(None, 7, 2_600_000_000) == 2
    monkeypatch.setenv(workers.ENV_JOBS, "1")
    assert workers.plan_jobs(None, 7, 10**6) == 1


def test_runtimes_sharing_an_export_or_a_framework_share_a_worker():
    groups = workers.groups_of(["torch", "openvino", "flax", "onnxruntime", "litert", "tensorflow", "custom-x"])
    assert ["onnxruntime", "openvino"] in groups and ["tensorflow", "litert"] in groups
    assert groups[-1] == ["custom-x"] and sorted(sum(groups, [])) == sorted(
        ["torch", "openvino", "flax", "onnxruntime", "litert", "tensorflow", "custom-x"])


def test_a_worker_keeps_its_answers_apart_from_what_libraries_print(tmp_path):
    """What a runtime's libraries print to stdout (from Python or from C) goes to the worker's log, never into
    the channel the parent reads its answers from."""
    import subprocess

    import numpy as np

    from convnextv2.parity_tests.cache import ParityCache

    ckpt = make_checkpoint(SMALL, seed=3, num_classes=10)
    code = textwrap.dedent("""
        import os
        from convnextv2.converters.runners import references
        from convnextv2.parity_tests import workers

        plain = references.ReferenceRunner.infer

        def noisy(*args):
            print("noise from python", flush=True)
            os.write(1, b"noise from C\\n")
            return plain(*args)

        references.ReferenceRunner.infer = noisy
        workers.worker_main()
    """)
    cache = ParityCache(None)
    try:
        with workers.hand_off(ckpt, np.zeros((2, 3, 64, 64), "float32")) as work:
            init = {"digest": cache.digest(ckpt), "cache_root": str(cache.root), "cache_persistent": False}
            tasks = [init, {"name": "torch", "dtype": "float32"}, {"name": "torch", "dtype": "float64"}]
            done = subprocess.run([sys.executable, "-c", code, str(work)], capture_output=True, text=True,
                                  input="".join(json.dumps(t) + "\n" for t in tasks))
            assert done.returncode == 0, done.stderr[-2000:]
            answers = [json.loads(line) for line in done.stdout.splitlines()]
            assert [a.get("dtype") for a in answers] == ["float32", "float64", None] and "cache" in answers[-1]
            assert all(a["status"] == "produced" and (work / a["features_file"]).is_file() for a in answers[:2])
            assert done.stderr.count("noise from python") == 2 and done.stderr.count("noise from C") == 2
    finally:
        cache.close()


def test_a_worker_does_not_inherit_the_transformers_framework_switches(monkeypatch, tmp_path):
    """The PyTorch peer sets USE_TF=0 in its process; a worker started after it (the transformers-tf worker of a
    later run in the same process) must not inherit it, or transformers in there finds no TensorFlow."""
    monkeypatch.setenv("USE_TF", "0")
    monkeypatch.setenv("USE_TORCH", "1")
    monkeypatch.setenv("USE_FLAX", "0")
    monkeypatch.setenv("CONVNEXTV2_UNRELATED", "kept")
    seen: dict[str, str] = {}

    class Started(Exception):
        pass

    def popen(args, env, **kwargs):
        seen.update(env)
        raise Started

    monkeypatch.setattr(workers.subprocess, "Popen", popen)
    with pytest.raises(Started):
        workers.Pool(tmp_path, "", None, False, [], 1, lambda message: None)._spawn(0)
    assert not {"USE_TF", "USE_TORCH", "USE_FLAX"} & set(seen)
    assert seen["CONVNEXTV2_UNRELATED"] == "kept" and "OMP_WAIT_POLICY" in seen
