"""Hostile, broken and absurd inputs: every reader refuses each with the toolkit's own error and exit
code 2, runs nothing, opens nothing outside the input's directory, and stays inside a memory limit far below
what the files declare.

The corpus is ``convnextv2.fixtures.hostile``; its probe runs every case of a format in one subprocess (an
audit hook watches opens and process starts, ``RLIMIT_AS`` caps memory) and reports one JSON line per case.
The probe converts each case through the command line too, which this test hands it (``fixtures/`` sits below
the command line and does not import it).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest

from convnextv2 import converters
from convnextv2.fixtures import hostile
from convnextv2.fixtures.hostile import probe
from convnextv2.parity_tests.conftest_helpers import run_cli

# Headroom above the probe's footprint once its readers are imported: a file declaring 1 TB (or 200 MB of
# pickle) must be refused without coming near it. Small enough that a proportional allocation fails.
MEMORY_LIMIT_MB = 160
CASE_SECONDS = 20
# Readers whose probe runs under RLIMIT_AS (all that do not import TensorFlow, which reserves address space
# at import time in amounts that make an address-space limit meaningless).
UNFENCED = {"savedmodel"}
# The probe process: the hostile probe, with the toolkit's command line run in-process (click's runner) under
# the same audit hook and memory limit as the readers. The runner is made before the probe fences memory.
_PROBE_WITH_CLI = """
import sys
from click.testing import CliRunner
from convnextv2.converters.cli import main as cli
from convnextv2.fixtures.hostile.probe import main

runner = CliRunner()

def run_cli(args):
    result = runner.invoke(cli, args)
    return result.exit_code, result.output, result.exception

sys.exit(main(sys.argv[1:], run_cli))
"""


def _probed_formats() -> list[str]:
    return [f for f in converters.available_formats() if hostile.cases_for(f)]


@cache
def probe_results(fmt: str, tmp_root: str) -> dict[str, dict]:
    """Every case's result; a probe process that dies is charged to the case it was on and resumed after it."""
    order = [c.id for c in hostile.cases_for(fmt)]
    results: dict[str, dict] = {}
    start_after = None
    for attempt in range(len(order)):
        args = [sys.executable, "-c", _PROBE_WITH_CLI, "probe", fmt, "--case-seconds",
                str(CASE_SECONDS), "--root", f"{tmp_root}/run{attempt}"]
        if fmt not in UNFENCED:
            args += ["--memory-limit-mb", str(MEMORY_LIMIT_MB)]
        if start_after is not None:
            args += ["--start-after", start_after]
        env = {**os.environ, "CONVNEXTV2_PROGRESS": "0"}
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1200)
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                results[record["case"]] = record
        missing = [case_id for case_id in order if case_id not in results]
        if not missing:
            break
        results[missing[0]] = {"case": missing[0], "outcome": "probe died", "message": done.stderr[-3000:]}
        start_after = missing[0]
    return results
@pytest.fixture(scope="module")
def probe_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


def _result(case: hostile.Case, root: Path) -> dict:
    fmt_root = root / case.format
    fmt_root.mkdir(exist_ok=True)
    results = probe_results(case.format, str(fmt_root))
    assert case.id in results, f"{case.id}: no result; the probe stopped at an earlier case"
    return results[case.id]


CASES = [pytest.param(case, id=case.id, marks=[pytest.mark.onnx] if case.format == "onnx" else [])
         for fmt in _probed_formats() for case in hostile.cases_for(fmt)]


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_refused_cleanly(case, probe_root):
    result = _result(case, probe_root)
    detail = json.dumps({k: result.get(k) for k in ("outcome", "error", "message", "traceback")}, indent=1)[:3000]
    if case.must_refuse:
        assert result["outcome"] == "refused", f"{case.id}: expected a toolkit error, got {detail}"
    else:
        assert result["outcome"] in ("refused", "accepted"), f"{case.id}: {detail}"
    if result["outcome"] == "refused":
        assert result["exit_code"] == 2
        assert re.search(case.match, result["message"], re.IGNORECASE), f"{case.id}: unclear message: {detail}"
        assert "input" in result["message"], f"{case.id}: the message does not name the file: {result['message']}"
        assert result["cli_exit_code"] == 2, f"{case.id}: CLI exit {result['cli_exit_code']}: {result['cli_output']}"
        assert not result["output_written"], "a refused conversion wrote its destination"
    else:  # the reader may accept it; auto-detection may still not recognise it
        assert result["cli_exit_code"] in (0, 2), f"{case.id}: CLI exit {result['cli_exit_code']}: {result['cli_output']}"
    assert result["cli_exception"] is None
    assert "Traceback" not in result["cli_output"]
    assert not result["marker"], f"{case.id}: THE PAYLOAD RAN (marker file exists)"
    assert result["watched"] == [], f"{case.id}: opened outside its directory or started a process: {result['watched']}"


@pytest.mark.parametrize("fmt", sorted(set(_probed_formats()) - UNFENCED))
def test_memory_limit_is_in_force(fmt, probe_root):
    """The RLIMIT_AS fence is real: the probe's limit is below the memory the 1 TB and 200 MB cases declare."""
    fmt_root = probe_root / fmt
    fmt_root.mkdir(exist_ok=True)
    results = probe_results(fmt, str(fmt_root))
    limits = {r["memory_limit"] for r in results.values() if "memory_limit" in r}
    assert limits and all(0 < limit < hostile.ONE_TB for limit in limits)
    code = ("import resource, sys; from convnextv2.fixtures.hostile.probe import limit_memory; "
            f"limit_memory({MEMORY_LIMIT_MB} << 20)\n"
            "try:\n    bytearray(200 << 20)\nexcept MemoryError:\n    print('fenced')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "fenced" in done.stdout, done.stderr


def test_watch_sees_what_it_must(tmp_path):
    """The probe's audit hook is not blind: it reports an open outside the input directory and a process start."""
    watch = probe.Watch()
    inside, outside = tmp_path / "input", tmp_path / hostile.SECRET
    inside.mkdir()
    outside.write_text("x")
    watch.fence, watch.allowed, watch.active = tmp_path.resolve(), inside.resolve(), True
    try:
        (inside / "ok").write_text("fine")
        outside.read_text()
        subprocess.run(["true"], check=True)
    finally:
        watch.active = False
    assert any(seen.startswith("open ") and seen.endswith(hostile.SECRET) for seen in watch.seen), watch.seen
    assert any(seen.startswith("subprocess.Popen") for seen in watch.seen), watch.seen
    assert not any(seen.endswith("/ok") for seen in watch.seen)


def test_payloads_are_real(tmp_path):
    """The corpus is genuinely hostile: with plain pickle, each standalone payload creates its marker."""
    names = [name for name, (_, standalone) in hostile.PAYLOADS.items() if standalone]
    script = (
        "import pickle, sys\n"
        "from pathlib import Path\n"
        "from convnextv2.fixtures import hostile\n"
        "root = Path(sys.argv[1])\n"
        "for name in sys.argv[2:]:\n"
        "    make, _ = hostile.PAYLOADS[name]\n"
        "    try:\n"
        "        pickle.loads(hostile.whole_pickle(make(str(root / name))))\n"
        "    except Exception:\n"
        "        pass\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path), *names], timeout=120, capture_output=True)
    deadline = time.monotonic() + 10  # Popen's shell may still be running when the script returns
    while len(list(tmp_path.iterdir())) < len(names) and time.monotonic() < deadline:
        time.sleep(0.1)
    ran = sorted(p.name for p in tmp_path.iterdir())
    assert ran == sorted(names)


def test_payload_cases_cover_every_placement():
    ids = {c.name for c in hostile.pickle_cases()}
    for where in ("top", "args", "nested", "tensor", "legacy", "raw", "message_hub"):
        assert any(i.endswith(f"-{where}") for i in ids), where
    assert len(hostile.PAYLOADS) >= 20


@pytest.mark.parametrize("case_id", ["original:pickle-os_system-args", "original:zip-storage-declares-1tb",
                                     "canonical:st-offset-out-of-range"])
def test_cli_in_a_fresh_process(tmp_path, case_id):
    """The same refusals through the installed entry point, as a user runs it."""
    case = next(c for fmt in ("original", "canonical") for c in hostile.cases_for(fmt) if c.id == case_id)
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    path = case.build(input_dir)
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", str(path), "-o", str(out), "--to", "canonical")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert re.search(case.match, result.stderr, re.IGNORECASE), result.stderr
    assert not out.exists() and not (tmp_path / hostile.MARKER).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_benign_control_converts(tmp_path):
    """The containers the payloads hide in are valid: with a plain value in the hole they convert."""
    path = hostile.write_checkpoint(tmp_path / "benign.pt", {"model": hostile.small_state(), "epoch": 3,
                                                             "args": hostile.HOLE},
                                    hostile.p_dict(lr=hostile.p_str("0.1")))
    ckpt = converters.load(path)
    assert ckpt.info["args"] == {"lr": "0.1"} and ckpt.config.depths == (1, 1, 1, 1)
    assert pickle.loads(hostile.whole_pickle(hostile.p_dict(a=hostile.p_int(1)))) == {"a": 1}
