"""The canonical, framework-neutral weight-naming schema (documented in docs/schema.md).

Every framework reference reads and writes these names; every converter maps a foreign format to and
from them. Layouts are fixed per tensor kind (see ``LAYOUTS``) so that a converter never guesses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from convnextv2.reference.errors import BadInputError, SchemaError
from convnextv2.reference.variants import IN_CHANNELS, MLP_RATIO, NUM_STAGES, ModelConfig

SCHEMA_NAME = "convnextv2-canonical"
# Bump on any change to names or layouts; readers refuse versions they do not know.
SCHEMA_VERSION = "1"
SUPPORTED_SCHEMA_VERSIONS = ("1",)

# Tensors outside the model proper (e.g. the FCMAE decoder of a raw pretraining checkpoint) are kept
# verbatim under this prefix, named ``extras.<source>.<original key>``, and never validated.
EXTRAS_PREFIX = "extras."

# kind -> (layout, description). One layout per kind; converters transpose to/from these.
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


def kind_of(name: str) -> str:
    if name.endswith(".conv.weight"):
        return "conv"
    if name.endswith("dwconv.weight"):
        return "dwconv"
    if name.endswith(("pwconv1.weight", "pwconv2.weight", "head.fc.weight")):
        return "linear"
    return "vector"


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


def schema_table_markdown() -> str:
    """The table in docs/schema.md, generated so the doc cannot drift from the code."""
    rows = [
        "| canonical name | shape | layout |",
        "|---|---|---|",
        "| `stem.conv.weight` | (C0, 3, 4, 4) | conv |",
        "| `stem.conv.bias` | (C0,) | vector |",
        "| `stem.norm.{weight,bias}` | (C0,) | vector |",
        "| `stages.{i}.downsample.norm.{weight,bias}` (i = 1..3) | (C(i-1),) | vector |",
        "| `stages.{i}.downsample.conv.weight` (i = 1..3) | (Ci, C(i-1), 2, 2) | conv |",
        "| `stages.{i}.downsample.conv.bias` | (Ci,) | vector |",
        "| `stages.{i}.blocks.{j}.dwconv.weight` | (C, 1, 7, 7) | dwconv |",
        "| `stages.{i}.blocks.{j}.dwconv.bias` | (C,) | vector |",
        "| `stages.{i}.blocks.{j}.norm.{weight,bias}` | (C,) | vector |",
        "| `stages.{i}.blocks.{j}.pwconv1.weight` | (4C, C) | linear |",
        "| `stages.{i}.blocks.{j}.pwconv1.bias` | (4C,) | vector |",
        "| `stages.{i}.blocks.{j}.grn.{gamma,beta}` | (4C,) | vector |",
        "| `stages.{i}.blocks.{j}.pwconv2.weight` | (C, 4C) | linear |",
        "| `stages.{i}.blocks.{j}.pwconv2.bias` | (C,) | vector |",
        "| `head.norm.{weight,bias}` (absent in FCMAE encoders) | (C3,) | vector |",
        "| `head.fc.weight` (absent when num_classes = 0) | (K, C3) | linear |",
        "| `head.fc.bias` | (K,) | vector |",
        "| `extras.<source>.<original key>` | as in the source | verbatim |",
    ]
    return "\n".join(rows)
