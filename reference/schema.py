"""The canonical, framework-neutral weight-naming schema (documented in docs/schema.md).

Every framework reference reads and writes these names; every converter maps a foreign format to and
from them. Layouts are fixed per tensor kind (see ``LAYOUTS``) so that a converter never guesses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from convnextv2.reference.errors import BadInputError, SchemaError
from convnextv2.reference.variants import GMACS_224, IN_CHANNELS, MLP_RATIO, NUM_STAGES, VARIANTS, ModelConfig

SCHEMA_NAME = "convnextv2-canonical"
# Bump on any change to names or layouts; readers refuse versions they do not know.
SCHEMA_VERSION = "1"
SUPPORTED_SCHEMA_VERSIONS = ("1",)

# Tensors outside the model proper (e.g. the FCMAE decoder of a raw pretraining checkpoint) are kept
# verbatim under this prefix, named ``extras.<source>.<original key>``, and never validated.
EXTRAS_PREFIX = "extras."

# kind -> (layout, description). One layout per kind; reference/layouts.py changes them to each format's.
LAYOUTS: dict[str, tuple[str, str]] = {
    "conv": ("(out, in, kh, kw)", "stem 4x4/4 and downsample 2x2/2 convolutions (PyTorch OIHW)"),
    "dwconv": ("(channels, 1, 7, 7)", "depthwise 7x7 convolution"),
    "linear": ("(out, in)", "pointwise MLP layers (PyTorch Linear)"),
    "vector": ("(n,)", "biases, LayerNorm weight/bias, GRN gamma/beta (flat, never (1,1,1,n))"),
}


def _block_shapes(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    hidden = MLP_RATIO * width
    return {
        f"{prefix}.dwconv.weight": (width, 1, 7, 7),
        f"{prefix}.dwconv.bias": (width,),
        f"{prefix}.norm.weight": (width,),
        f"{prefix}.norm.bias": (width,),
        f"{prefix}.pwconv1.weight": (hidden, width),
        f"{prefix}.pwconv1.bias": (hidden,),
        f"{prefix}.grn.gamma": (hidden,),
        f"{prefix}.grn.beta": (hidden,),
        f"{prefix}.pwconv2.weight": (width, hidden),
        f"{prefix}.pwconv2.bias": (width,),
    }


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape, in forward order (the order canonical files are written in)."""
    d = config.dims
    shapes: dict[str, tuple[int, ...]] = {
        "stem.conv.weight": (d[0], IN_CHANNELS, 4, 4),
        "stem.conv.bias": (d[0],),
        "stem.norm.weight": (d[0],),
        "stem.norm.bias": (d[0],),
    }
    for stage in range(NUM_STAGES):
        if stage > 0:
            shapes[f"stages.{stage}.downsample.norm.weight"] = (d[stage - 1],)
            shapes[f"stages.{stage}.downsample.norm.bias"] = (d[stage - 1],)
            shapes[f"stages.{stage}.downsample.conv.weight"] = (d[stage], d[stage - 1], 2, 2)
            shapes[f"stages.{stage}.downsample.conv.bias"] = (d[stage],)
        for block in range(config.depths[stage]):
            shapes.update(_block_shapes(f"stages.{stage}.blocks.{block}", d[stage]))
    if config.head_norm:
        shapes["head.norm.weight"] = (d[-1],)
        shapes["head.norm.bias"] = (d[-1],)
    if config.num_classes > 0:
        shapes["head.fc.weight"] = (config.num_classes, d[-1])
        shapes["head.fc.bias"] = (config.num_classes,)
    return shapes


def parameter_count(config: ModelConfig) -> int:
    """Model parameters of ``config``: the sum over the canonical tensors' shapes."""
    total = 0
    for shape in expected_shapes(config).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def variant_table() -> list[dict[str, Any]]:
    """The released sizes with their parameter counts (with and without the head) and published GMACs."""
    rows = []
    for name, (depths, dims) in VARIANTS.items():
        cfg = ModelConfig(depths=depths, dims=dims)
        rows.append({
            "name": name,
            "depths": list(depths),
            "dims": list(dims),
            "params": parameter_count(cfg),
            "params_headless": parameter_count(cfg.with_(num_classes=0, head_norm=False)),
            "gmacs_224": GMACS_224[name],
        })
    return rows


def validate(shapes: Mapping[str, tuple[int, ...]], config: ModelConfig, where: str) -> None:
    """Raise one SchemaError listing every missing, unexpected and mis-shaped tensor."""
    expected = expected_shapes(config)
    problems: list[str] = []
    for name, shape in expected.items():
        if name not in shapes:
            problems.append(f"missing tensor {name}: expected shape {list(shape)}")
        elif tuple(shapes[name]) != shape:
            problems.append(f"tensor {name}: expected shape {list(shape)}, found {list(shapes[name])}")
    for name in shapes:
        if name not in expected and not name.startswith(EXTRAS_PREFIX):
            problems.append(f"unexpected tensor {name} (shape {list(shapes[name])}) for a {config.variant} model")
    if problems:
        raise SchemaError(where, problems)


_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


def infer_config(shapes: Mapping[str, tuple[int, ...]], where: str) -> ModelConfig:
    """Read depths, dims and head from canonical tensor shapes alone (released files carry no config)."""
    stem = shapes.get("stem.conv.weight")
    if stem is None or len(stem) != 4:
        raise BadInputError(f"{where}: cannot find the stem convolution (stem.conv.weight) to size the model")
    blocks: dict[int, set[int]] = {}
    for name in shapes:
        match = _BLOCK_KEY.match(name)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if sorted(blocks) != list(range(NUM_STAGES)):
        raise BadInputError(
            f"{where}: expected blocks in stages 0..{NUM_STAGES - 1}, found stages {sorted(blocks)}"
        )
    # A gap in block indices is reported by validate() as missing tensors, so count up to the highest.
    depths = tuple(max(blocks[s]) + 1 for s in range(NUM_STAGES))
    dims = [stem[0]]
    for stage in range(1, NUM_STAGES):
        conv = shapes.get(f"stages.{stage}.downsample.conv.weight")
        dw = shapes.get(f"stages.{stage}.blocks.0.dwconv.weight")
        if conv is not None and len(conv) >= 1:
            dims.append(conv[0])
        elif dw is not None and len(dw) >= 1:
            dims.append(dw[0])
        else:
            raise BadInputError(f"{where}: cannot tell the width of stage {stage} (no downsample conv, no block 0)")
    fc = shapes.get("head.fc.weight")
    num_classes = fc[0] if fc is not None and len(fc) == 2 else 0
    head_norm = "head.norm.weight" in shapes or num_classes > 0
    try:
        return ModelConfig(depths=depths, dims=tuple(dims), num_classes=num_classes, head_norm=head_norm)
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc}") from None


# ---------------------------------------------------------------- the tensor table of docs/schema.md

# docs/schema.md holds the table between these markers; ``python -m convnextv2.reference.schema --markdown
# docs/schema.md`` rewrites it, and parity_tests/test_schema_doc.py fails when it is stale.
TABLE_BEGIN = "<!-- tensor table: generated by `python -m convnextv2.reference.schema --markdown docs/schema.md` -->"
TABLE_END = "<!-- end of generated tensor table -->"


def _kind_of_shape(shape: tuple[int, ...]) -> str:
    """The ``LAYOUTS`` kind of a canonical shape: the rank tells them apart, and a depthwise kernel has in=1."""
    if len(shape) == 4:
        return "dwconv" if shape[1:] == (1, 7, 7) else "conv"
    return "linear" if len(shape) == 2 else "vector"


def markdown_table() -> str:
    """The tensor table of docs/schema.md, derived from ``expected_shapes`` so the doc cannot drift.

    Shapes are computed for a model whose widths and class count are distinctive numbers, then written back
    as symbols: ``C0``/``C3`` at the ends, ``C``/``4C`` inside a block, ``C(i-1)``/``Ci`` in a downsample,
    ``K`` for the classes. Weight/bias pairs of one module with one shape share a row."""
    dims = (1009, 2003, 3001, 4001)  # none of these, nor 4x one, equals another or a literal size
    classes = 997
    full = ModelConfig(depths=(1,) * NUM_STAGES, dims=dims, num_classes=classes)
    headless = set(expected_shapes(full.with_(num_classes=0)))
    encoder = set(expected_shapes(full.with_(num_classes=0, head_norm=False)))
    rows: list[list[str]] = []  # [module, leaves, note, shape, kind], in forward order
    for name, shape in expected_shapes(full).items():
        where = re.match(r"^stages\.(\d+)\.(blocks\.\d+|downsample)\.", name)
        note = ""
        if where is None:
            symbols = {dims[0]: "C0", dims[-1]: "C3", classes: "K"}
            if name not in headless:
                note = " (absent when num_classes = 0)"
            elif name not in encoder:
                note = " (absent in FCMAE encoders)"
        elif where.group(2) == "downsample":
            stage = int(where.group(1))
            symbols = {dims[stage]: "Ci", dims[stage - 1]: "C(i-1)"}
            name, note = "stages.{i}.downsample." + name[where.end():], " (i = 1..3)"
        else:
            stage = int(where.group(1))
            symbols = {dims[stage]: "C", MLP_RATIO * dims[stage]: f"{MLP_RATIO}C"}
            name = "stages.{i}.blocks.{j}." + name[where.end():]
        text = "(" + ", ".join(symbols.get(n, str(n)) for n in shape) + ("," if len(shape) == 1 else "") + ")"
        module, leaf = name.rsplit(".", 1)
        row = [module, leaf, note, text, _kind_of_shape(shape)]
        if any(r[0] == module and leaf in r[1].strip("{}").split(",") for r in rows):
            continue  # the same symbolic tensor in another stage
        if rows and rows[-1][0] == module and rows[-1][2:] == row[2:]:
            rows[-1][1] = "{" + rows[-1][1].strip("{}") + "," + leaf + "}"
        else:
            rows.append(row)
    lines = ["| canonical name | shape | layout |", "|---|---|---|"]
    lines += [f"| `{module}.{leaves}`{note} | {text} | {kind} |" for module, leaves, note, text, kind in rows]
    lines.append(f"| `{EXTRAS_PREFIX}<source>.<original key>` | as in the source | verbatim |")
    return "\n".join(lines)


def with_markdown_table(doc: str, where: str = "docs/schema.md") -> str:
    """``doc`` with the text between the table markers replaced by ``markdown_table()``."""
    start, end = doc.find(TABLE_BEGIN), doc.find(TABLE_END)
    if start < 0 or end < start:
        raise BadInputError(f"{where}: expected the markers {TABLE_BEGIN!r} ... {TABLE_END!r}, found none")
    return doc[:start + len(TABLE_BEGIN)] + "\n" + markdown_table() + "\n" + doc[end:]


if __name__ == "__main__":
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m convnextv2.reference.schema")
    parser.add_argument("--markdown", nargs="?", const="-", metavar="DOC", required=True,
                        help="print the tensor table, or rewrite it in DOC between its markers")
    target = parser.parse_args().markdown
    if target == "-":
        print(markdown_table())
    else:
        path = Path(target)
        path.write_text(with_markdown_table(path.read_text(encoding="utf-8"), target), encoding="utf-8")
