"""docs/schema.md against the code: its tensor table is generated from ``schema.expected_shapes`` and must be
the current output of the generator; the generated table, expanded for real configs, must list exactly the
tensors the schema expects; the version and the layout per kind must be the code's."""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path

import pytest

from convnextv2.reference import schema
from convnextv2.reference.variants import MLP_RATIO, NUM_STAGES, ModelConfig, config_for

# The repository's docs folder (this file is parity_tests/test_schema_doc.py in the repository).
DOC = Path(__file__).resolve().parents[1] / "docs" / "schema.md"
REGENERATE = "python -m convnextv2.reference.schema --markdown docs/schema.md"


def _doc() -> str:
    assert DOC.is_file(), f"{DOC}: not found; this test reads the repository's docs/schema.md"
    return DOC.read_text(encoding="utf-8")


def test_doc_table_is_the_generated_one():
    doc = _doc()
    fresh = schema.with_markdown_table(doc, str(DOC))
    if fresh != doc:
        first = next(line for line in difflib.unified_diff(doc.splitlines(), fresh.splitlines(), lineterm="", n=0)
                     if line[:1] in "+-" and not line.startswith(("+++", "---")))
        pytest.fail(f"docs/schema.md: the tensor table is stale (first difference: {first!r}); run: {REGENERATE}")


def test_doc_states_the_code_schema_version_and_layouts():
    doc = _doc()
    assert f"Schema version: **{schema.SCHEMA_VERSION}**" in doc
    for kind, (layout, _what) in schema.LAYOUTS.items():
        assert f"| {kind} | {layout} |" in doc, f"docs/schema.md: no layout row '| {kind} | {layout} |'"


def _expand(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The generated table read back for one config: every row's name pattern and shape symbols made
    concrete, rows marked absent dropped when they are, so it can be compared with ``expected_shapes``."""
    d, k = config.dims, config.num_classes
    out: dict[str, tuple[int, ...]] = {}
    rows = schema.markdown_table().splitlines()[2:]
    for row in rows:
        name_cell, shape_cell, kind = (cell.strip() for cell in row.strip("|").split("|"))
        assert kind in schema.LAYOUTS or kind == "verbatim", row
        if name_cell.startswith(f"`{schema.EXTRAS_PREFIX}"):
            continue
        pattern = re.fullmatch(r"`([^`]+)`(?: \((.+)\))?", name_cell)
        assert pattern, row
        name, note = pattern.group(1), pattern.group(2) or ""
        if (note == "absent when num_classes = 0" and k == 0) or (note == "absent in FCMAE encoders"
                                                                 and not config.head_norm):
            continue
        leaves = re.search(r"\{([^}]+)\}$", name)
        names = [name[:leaves.start()] + leaf for leaf in leaves.group(1).split(",")] if leaves else [name]
        stages = range(1, NUM_STAGES) if "{i}.downsample" in name else range(NUM_STAGES)
        for full, stage in itertools.product(names, stages if "{i}" in name else [None]):
            symbols = {"C0": d[0], "C3": d[-1], "K": k}
            if stage is not None:
                symbols.update({"C": d[stage], f"{MLP_RATIO}C": MLP_RATIO * d[stage], "Ci": d[stage],
                                "C(i-1)": d[stage - 1]})
            shape = tuple(symbols[s] if s in symbols else int(s) for s in shape_cell[1:-1].rstrip(",").split(", "))
            blocks = range(config.depths[stage]) if "{j}" in full else [None]
            for block in blocks:
                concrete = full.replace("{i}", str(stage)).replace("{j}", str(block))
                assert concrete not in out, f"{concrete} appears twice in the generated table"
                out[concrete] = shape
    return out


@pytest.mark.parametrize("config", [
    config_for("atto"),
    config_for("tiny", num_classes=7),
    config_for("nano", num_classes=0),
    config_for("atto", num_classes=0, head_norm=False),
], ids=["atto", "tiny-7-classes", "nano-headless", "atto-fcmae-encoder"])
def test_generated_table_lists_exactly_the_expected_tensors(config):
    assert _expand(config) == schema.expected_shapes(config)
