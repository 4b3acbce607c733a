"""``convnextv2 export-onnx``: any checkpoint the toolkit reads -> a checked ONNX file (docs/onnx.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from convnextv2.converters.cli import choices
from convnextv2.converters.cli.checkpoints import apply_preprocessing, preprocessing_options
from convnextv2.converters.onnx.export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, VIAS


@click.command("export-onnx", short_help="Export to ONNX, checked in onnxruntime before it is written.")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path), help="Destination .onnx file.")
@click.option("--from", "from_format", type=choices.FROM, default="auto", show_default=True,
              help="Format of SRC (auto: detected by content).")
@click.option("--variant", default=None, help="Expected size (atto..huge or custom:...); cross-checked against the shapes.")
@click.option("--ema", is_flag=True, help="Original checkpoints: export model_ema instead of model.")
@choices.prefix_option
@click.option("--via", type=click.Choice(list(VIAS)), default="torch", show_default=True,
              help="Which reference is exported: torch (torch.onnx), tensorflow (tf2onnx), flax (jax2onnx).")
@click.option("--opset", type=click.IntRange(MIN_OPSET, MAX_OPSET), default=None,
              help=f"ONNX opset (default: {DEFAULT_OPSET['torch']} for torch, {DEFAULT_OPSET['tensorflow']} for tensorflow).")
@click.option("--dynamic-hw", is_flag=True, help="Also make height and width dynamic (multiples of 32).")
@click.option("--features", is_flag=True, help="Add stem, stage1..stage4 and pooled outputs (for localising divergence).")
@click.option("--fp16", is_flag=True, help="float16 weights; LayerNorm and GRN computed in float32 (torch path).")
@click.option("--external-data/--no-external-data", default=None,
              help="Weights in <output>.data (default: only when the model exceeds ~1.8 GB).")
@click.option("--check-size", type=int, default=None,
              help="Image size of the parity check (default: the checkpoint's input size).")
@click.option("--overwrite", is_flag=True, help="Replace an existing destination (atomically).")
@preprocessing_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def export_onnx(src: Path, dst: Path, from_format: str, variant: str | None, ema: bool, prefix: str | None, via: str, opset: int | None,
                dynamic_hw: bool, features: bool, fp16: bool, external_data: bool | None, check_size: int | None,
                overwrite: bool, as_json: bool, **preprocessing: Any) -> None:
    """Export SRC to ONNX, check it in onnxruntime (ORT_ENABLE_ALL) against the float64 PyTorch referee,
    and only then write DST. Exit 1 when parity fails, 2 when a path cannot run here (the message says why).

    A thin command over converters.save (the same gate and read-back as ``convert --to onnx``)."""
    from convnextv2 import converters
    from convnextv2.converters.fs_faults import check_destination
    from convnextv2.converters.onnx import export as onnx_export
    from convnextv2.converters.onnx.interface import output_names
    from convnextv2.reference.errors import MissingDependencyError

    check_destination(dst, overwrite)
    reason = onnx_export.why_unavailable(via)
    if reason:
        raise MissingDependencyError(reason)
    ckpt = converters.load(src, format=from_format, variant=variant, **choices.read_options(ema, prefix=prefix))
    choices.say_notes(ckpt)
    apply_preprocessing(ckpt, preprocessing)
    say = (lambda _m: None) if as_json else (lambda m: click.echo(m, err=True))
    used_opset = onnx_export.checked_opset(via, opset)
    say(f"exporting through {via} (opset {used_opset}{', fp16' if fp16 else ''}{', features' if features else ''})")
    result = converters.save(ckpt, dst, "onnx", overwrite=overwrite, warn=lambda m: click.echo(f"warning: {m}", err=True),
                             log=say, via=via, opset=opset, dynamic_hw=dynamic_hw, features=features, fp16=fp16,
                             external_data=external_data, size=check_size, source_path=src)
    data_path = (dst.with_name(onnx_export.data_file_name(dst))
                 if onnx_export.writes_external_data(ckpt, fp16, external_data) else None)
    outputs = output_names(ckpt, features)
    if as_json:
        summary = {"output": str(dst), "external_data": str(data_path) if data_path else None, "via": via,
                   "opset": used_opset, "outputs": outputs, **result}
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        extra = f" + {data_path.name}" if data_path else ""
        click.echo(f"wrote {dst}{extra} ({ckpt.config.variant}, via {via}, opset {used_opset}, "
                   f"outputs {', '.join(outputs)})")
        click.echo(f"parity: {result['check']['message']}")
