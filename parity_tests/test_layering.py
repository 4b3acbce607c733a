"""The package's layers (docs/architecture.md), enforced on the source: every import in every file, including
those inside functions, under ``if TYPE_CHECKING:``, relative ones and ``importlib.import_module("...")`` with a
literal name.

    reference/                  imports nothing else of the package
    converters/                 reference/ only
    fixtures/, parity_tests/    reference/, converters/
    converters/cli/             anything (the command line sits on top); imported only by tests and __main__
    tools/, benchmarks/         outside the package: they may import it, the package never imports them

Test files (``parity_tests/test_*.py``) may import anything in the package, the command line included: they
drive it. Every other module of ``parity_tests/`` is library code and keeps to its layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("reference", "converters", "fixtures", "parity_tests")
CLI = "convnextv2.converters.cli"
OUTSIDE = ("tools", "benchmarks")


def module_name(relpath: str) -> str:
    parts = list(Path(relpath).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["convnextv2", *parts])


def forbidden(relpath: str) -> dict[str, str]:
    """Import prefix -> why it is forbidden, for the file at ``relpath`` (relative to the repository root)."""
    parts = Path(relpath).parts
    layer, name = parts[0], parts[-1]
    rules = {top: "the package never imports the tools/benchmarks outside it" for top in OUTSIDE}
    # The folders are only importable through the convnextv2 namespace; a bare name works by accident of cwd.
    rules.update({top: "import it as convnextv2." + top for top in LAYERS})
    if layer == "reference":
        rules.update({f"convnextv2.{other}": "reference/ is the bottom layer"
                      for other in ("converters", "parity_tests", "fixtures")})
    elif layer == "converters" and parts[1:2] != ("cli",):
        rules.update({f"convnextv2.{other}": "converters/ imports reference/ only"
                      for other in ("parity_tests", "fixtures")})
        if name != "__main__.py":
            rules[CLI] = "only tests and __main__ import the command line"
    elif layer == "fixtures":
        rules["convnextv2.parity_tests"] = "fixtures/ imports reference/ and converters/ only"
        rules[CLI] = "only tests and __main__ import the command line"
    elif layer == "parity_tests" and not name.startswith("test_"):
        rules[CLI] = "only tests and __main__ import the command line"
    return rules


def _imported_names(tree: ast.AST, here: str, is_package: bool) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here.split(".") if is_package else here.split(".")[:-1]
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            # `from convnextv2 import parity_tests` names the module in the alias, not in node.module.
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def check_source(relpath: str, source: str) -> list[str]:
    """One line per forbidden import in ``source`` (the text of the file at ``relpath``)."""
    rules = forbidden(relpath)
    tree = ast.parse(source, filename=relpath)
    problems = []
    seen = set()
    for line, name in _imported_names(tree, module_name(relpath), Path(relpath).name == "__init__.py"):
        for prefix, why in rules.items():
            if (name == prefix or name.startswith(prefix + ".")) and (line, prefix) not in seen:
                seen.add((line, prefix))
                problems.append(f"{relpath}:{line}: imports {name} ({why})")
    return problems


def package_files() -> list[Path]:
    return sorted(path for layer in LAYERS for path in (ROOT / layer).rglob("*.py"))


def test_every_import_keeps_to_its_layer():
    files = package_files()
    assert len(files) > 40, f"found only {len(files)} source files under {ROOT}"
    problems = [p for path in files
                for p in check_source(path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8"))]
    assert not problems, "imports across the layers (docs/architecture.md):\n" + "\n".join(problems)


@pytest.mark.parametrize(("relpath", "source", "expected"), [
    ("reference/schema.py", "import numpy\n\ndef f():\n    from convnextv2.converters import load\n",
     "reference/schema.py:4: imports convnextv2.converters"),
    ("reference/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import convnextv2.fixtures.make\n",
     "reference/x.py:3: imports convnextv2.fixtures"),
    ("reference/x.py", "from convnextv2 import parity_tests\n", "reference/x.py:1: imports convnextv2.parity_tests"),
    ("converters/hf.py", "from ..parity_tests.inputs import seeded_images\n",
     "converters/hf.py:1: imports convnextv2.parity_tests"),
    ("converters/onnx_export.py", "import importlib\nm = importlib.import_module('convnextv2.fixtures')\n",
     "converters/onnx_export.py:2: imports convnextv2.fixtures"),
    ("converters/hf.py", "from convnextv2.converters.cli import main\n", "imports convnextv2.converters.cli"),
    ("fixtures/hostile.py", "def probe():\n    from convnextv2.converters.cli import main\n",
     "fixtures/hostile.py:2: imports convnextv2.converters.cli"),
    ("fixtures/make.py", "from convnextv2.parity_tests import harness\n", "imports convnextv2.parity_tests"),
    ("parity_tests/harness.py", "from convnextv2.converters import cli\n", "imports convnextv2.converters.cli"),
    ("parity_tests/harness.py", "import tools.gpu_check\n", "imports tools.gpu_check"),
    ("converters/cli/parity.py", "from benchmarks import report\n", "imports benchmarks"),
    ("converters/canonical.py", "from reference.schema import SCHEMA\n", "imports reference.schema"),
])
def test_a_forbidden_import_is_named_with_file_and_line(relpath, source, expected):
    problems = check_source(relpath, source)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize(("relpath", "source"), [
    ("converters/cli/demo.py", "from convnextv2.fixtures import write_fixture\nfrom convnextv2.parity_tests import inputs\n"),
    ("converters/__main__.py", "from convnextv2.converters.cli import main\n"),
    ("converters/cli/__init__.py", "from . import checkpoints\nfrom .parity import parity\n"),
    ("converters/hf.py", "from convnextv2.reference import schema\nfrom . import torchzip\n"),
    ("fixtures/make.py", "from convnextv2.converters.checkpoint import Checkpoint\n"),
    ("parity_tests/test_parity_cli.py", "from convnextv2.converters.cli import main\n"),
    ("parity_tests/harness.py", "from convnextv2 import converters\nfrom convnextv2.converters import cli_like\n"),
])
def test_an_allowed_import_passes(relpath, source):
    assert check_source(relpath, source) == []


def test_relative_imports_resolve_against_the_file():
    # converters/cli/__init__.py is the package convnextv2.converters.cli: `from .. import x` leaves it.
    assert check_source("converters/cli/__init__.py", "from ...parity_tests import harness\n") == []
    assert check_source("converters/x.py", "from .. import fixtures\n") == [
        "converters/x.py:1: imports convnextv2.fixtures (converters/ imports reference/ only)"]
