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


# ------------------------------------------------------------------ the shape of the code

MAX_MODULE_LINES = 600
MAX_PARAMETERS = 12


def _our_modules() -> dict[str, Path]:
    return {module_name(path.relative_to(ROOT).as_posix()): path for path in package_files()}


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (module name -> source text in, every import counted: at the top,
    inside functions, under TYPE_CHECKING). ``from a import b`` counts as an import of ``a.b`` where that is a
    module of ours, else of ``a``; the parent packages Python initialises on the way are not edges (every
    sibling import would otherwise loop through its package's ``__init__``)."""
    graph: dict[str, set[str]] = {}
    for name, source in sources.items():
        tree = ast.parse(source)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name.split(".") if _is_package(name, sources) else name.split(".")[:-1]
                    anchor = package[:len(package) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in sources else base)
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if called in ("import_module", "__import__"):
                    targets.add(node.args[0].value)
        graph[name] = {t for t in targets if t in sources and t != name}
    return graph


def _is_package(name: str, sources: dict[str, str]) -> bool:
    return any(other.startswith(name + ".") for other in sources)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_no_import_cycles():
    sources = {name: path.read_text(encoding="utf-8") for name, path in _our_modules().items()}
    cycles = import_cycles(import_graph(sources))
    assert not cycles, "modules that import each other (directly or round a loop):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles)


def test_a_cycle_through_a_function_local_import_is_found():
    sources = {"convnextv2.converters": "from convnextv2.converters import verify\n",
               "convnextv2.converters.verify": "def f():\n    from convnextv2.converters import changes\n",
               "convnextv2.converters.changes": "def g():\n    from convnextv2.converters.verify import f\n",
               "convnextv2.converters.canonical": "from . import changes\n"}
    assert import_cycles(import_graph(sources)) == [["convnextv2.converters.changes", "convnextv2.converters.verify"]]


def test_no_module_over_the_line_budget():
    long = {path.relative_to(ROOT).as_posix(): n for path in package_files()
            if not path.name.startswith("test_") and (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"library modules over {MAX_MODULE_LINES} lines: {long}"


def too_many_parameters(source: str, relpath: str) -> list[str]:
    """Functions with more than MAX_PARAMETERS parameters (self/cls not counted). The click command functions
    (decorated with click's ``command``) are exempt: each parameter is a command-line option."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        decorators = [ast.unparse(d) for d in node.decorator_list]
        if any(".command(" in d or d.startswith("click.") or ".command" in d for d in decorators):
            continue
        arguments = node.args
        names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
        names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
        count = len([n for n in names if n not in ("self", "cls")])
        if count > MAX_PARAMETERS:
            found.append(f"{relpath}:{node.lineno}: {node.name} takes {count} parameters")
    return found


def test_no_library_function_takes_more_than_a_dozen_parameters():
    problems = [p for path in package_files() if not path.name.startswith("test_")
                for p in too_many_parameters(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())]
    assert not problems, "\n".join(problems)


def test_thirteen_parameters_are_found():
    source = "def f(a, b, c, d, e, f, g, h, i, j, k, l, *, m):\n    pass\n\ndef ok(self, a, b):\n    pass\n"
    assert too_many_parameters(source, "x.py") == ["x.py:1: f takes 13 parameters"]


def _shadowed_libraries(source: str, modules: set[str]) -> list[str]:
    """Names a file binds to a module of ours (``modules``) that are also libraries the same file imports."""
    libraries: set[str] = set()
    ours: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    if alias.asname:
                        ours[alias.asname] = node.lineno
                elif not alias.name.startswith("convnextv2."):
                    libraries.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            ours.update({alias.asname or alias.name: node.lineno for alias in node.names
                         if f"{node.module}.{alias.name}" in modules})
    return [f"line {line}: {name}" for name, line in sorted(ours.items()) if name in libraries]


def test_no_module_of_ours_shadows_a_library_it_sits_beside():
    modules = _our_modules()
    problems = []
    for path in modules.values():
        shadowed = _shadowed_libraries(path.read_text(encoding="utf-8"), set(modules))
        problems.extend(f"{path.relative_to(ROOT).as_posix()} {p}" for p in shadowed)
    assert not problems, "our modules imported under the name of a library the same file imports:\n" + "\n".join(problems)


def test_a_shadowing_import_is_found():
    source = ("import openvino\n\ndef f():\n    from convnextv2.converters import openvino as openvino_format\n"
              "    from convnextv2.converters import openvino\n")
    assert _shadowed_libraries(source, {"convnextv2.converters.openvino"}) == ["line 5: openvino"]


RULE_HOME = "reference/features.py"


def restated_rules(source: str) -> list[str]:
    """Where a file writes the final-output rule (``"logits" if ... else "pooled"``) or lists the feature names
    (a literal holding "stem" and "stage1") itself instead of taking them from the parity rule."""
    found = []
    tree = ast.parse(source)
    # A dict's value is data another library defines (transformers' ``stage_names``), not our feature list.
    data = {id(value) for node in ast.walk(tree) if isinstance(node, ast.Dict) for value in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.IfExp):
            branches = {b.value for b in (node.body, node.orelse) if isinstance(b, ast.Constant)}
            if branches == {"logits", "pooled"}:
                found.append(f"line {node.lineno}: the final-output rule")
        elif isinstance(node, ast.Tuple | ast.List | ast.Set) and id(node) not in data:
            names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
            if {"stem", "stage1"} <= names:
                found.append(f"line {node.lineno}: the feature names")
    return found


def test_the_final_output_rule_and_the_feature_names_are_written_once():
    problems = []
    for path in package_files():
        relpath = path.relative_to(ROOT).as_posix()
        if relpath != RULE_HOME and not path.name.startswith("test_"):
            problems.extend(f"{relpath} {p}" for p in restated_rules(path.read_text(encoding="utf-8")))
    assert not problems, f"written again outside {RULE_HOME}:\n" + "\n".join(problems)


def test_a_restated_rule_is_found():
    source = 'final = "pooled" if n == 0 else "logits"\nNAMES = ["stem", "stage1", "stage2"]\n'
    assert restated_rules(source) == ["line 1: the final-output rule", "line 2: the feature names"]
