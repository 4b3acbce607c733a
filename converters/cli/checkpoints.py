"""``convnextv2 variants``, ``inspect``, ``convert`` and ``fixture``: the checkpoint commands (docs/cli.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from convnextv2.converters.cli import choices


def _emit(data: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo("\n".join(lines))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def variants(as_json: bool) -> None:
    """List the released ConvNeXt V2 sizes."""
    from convnextv2.reference.variants import variant_table

    rows = variant_table()
    lines = [f"{'name':<6} {'depths':<13} {'dims':<22} {'params':>12} {'encoder':>12} {'GMACs@224':>9}"]
    for r in rows:
        lines.append(
            f"{r['name']:<6} {','.join(map(str, r['depths'])):<13} {','.join(map(str, r['dims'])):<22} "
            f"{r['params']:>12,} {r['params_headless']:>12,} {r['gmacs_224']:>9}"
        )
    lines.append("custom sizes: --variant 'custom:depths=2,2,6,2;dims=40,80,160,320'")
    _emit(rows, as_json, lines)


@click.command(short_help="Describe a checkpoint: format, size, classes, parameters.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--from", "fmt", type=choices.FROM, default="auto", show_default=True,
              help="Format of PATH (auto: detected by content).")
@click.option("--ema", is_flag=True, help="Original checkpoints: read model_ema instead of model.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, fmt: str, ema: bool, as_json: bool) -> None:
    """Describe a checkpoint: format, size, classes, parameters, dtype, metadata."""
    from convnextv2 import converters

    ckpt = converters.load(path, format=fmt, **({"ema": True} if ema else {}))
    data = ckpt.describe()
    data["path"] = str(path)
    pre = ckpt.preprocessing
    lines = [
        f"path         {path}",
        f"format       {data['format']}" + (f" ({ckpt.source.layout.get('layout')})" if ckpt.source.layout.get("layout") else ""),
        f"variant      {data['variant']}  depths={data['depths']} dims={data['dims']}",
        f"classes      {data['num_classes'] or 'none (headless)'}"
        + ("" if data["head_norm"] else ", no final norm"),
        f"parameters   {data['parameters']:,}  dtype {data['dtype']}",
        f"input        {pre.input_size}px, crop_pct {pre.crop_pct} ({pre.crop_mode}), {pre.interpolation}, "
        f"mean {list(pre.mean)}, std {list(pre.std)}",
        f"sha256       {ckpt.source.sha256 or '-'}",
    ]
    if data["extras"]:
        lines.append(f"extras       {data['extras']} tensors kept verbatim under extras.*")
    if ckpt.info:
        lines.append(f"info         {json.dumps(ckpt.info, default=str)[:200]}")
    _emit(data, as_json, lines)


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path), help="Destination path.")
@click.option("--to", "to_format", required=True, type=choices.TO, help="Output format.")
@click.option("--from", "from_format", type=choices.FROM, default="auto", show_default=True,
              help="Format of SRC (auto: detected by content).")
@click.option("--variant", default=None, help="Expected size (atto..huge or custom:...); cross-checked against the shapes.")
@click.option("--ema", is_flag=True, help="Original checkpoints: convert model_ema instead of model.")
@click.option("--layout", type=choices.ORIGINAL_LAYOUT, default=None,
              help="--to original: which original layout (default: the source's, else finetuned/fcmae).")
@click.option("--overwrite", is_flag=True, help="Replace an existing destination (atomically).")
@click.option("--source-digest/--no-source-digest", default=True, show_default=True,
              help="Record SRC's sha256 in the output's metadata. It costs one more read of SRC, hashed on a "
                   "second core while the tensors stream (the Huge file: about 1.4 s of CPU). A digest SRC "
                   "already carries from an earlier conversion is always kept.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def convert(src: Path, dst: Path, to_format: str, from_format: str, variant: str | None, ema: bool,
            layout: str | None, overwrite: bool, source_digest: bool, as_json: bool) -> None:
    """Convert SRC to another format, writing DST atomically."""
    from convnextv2 import converters
    from convnextv2.converters.atomic import check_destination

    check_destination(dst, overwrite)  # fail before reading a large source
    ckpt = converters.load(src, format=from_format, variant=variant, **({"ema": True} if ema else {}))
    if not source_digest and ckpt.source.pending_digest() is not None:
        ckpt.source.sha256 = ""
    options: dict[str, Any] = {"overwrite": overwrite}
    if layout is not None:
        if to_format != "original":
            raise click.UsageError("--layout applies only to --to original")
        options["layout"] = layout
    converters.save(ckpt, dst, format=to_format, **options)
    summary = {"source": str(src), "from": ckpt.source.format, "output": str(dst), "to": to_format,
               "variant": ckpt.config.variant, "num_classes": ckpt.config.num_classes,
               "parameters": ckpt.parameter_count}
    _emit(summary, as_json, [f"wrote {dst} ({to_format}, {ckpt.config.variant}, {ckpt.parameter_count:,} parameters)"])


@click.command(short_help="Write a deterministic random checkpoint in any format.")
@click.option("--variant", default="atto", show_default=True, help="atto..huge or custom:depths=...;dims=...")
@click.option("--format", "fmt", type=choices.FIXTURE, default="original", show_default=True,
              help="original/fcmae/fcmae-sparse: the facebookresearch layouts; any other: the canonical fixture "
                   "written through that format's converter.")
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path), help="Destination path.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed: the same seed gives the same file.")
@click.option("--num-classes", default=1000, show_default=True, type=int,
              help="Classifier width (the fcmae layouts are headless and ignore it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing destination (atomically).")
def fixture(variant: str, fmt: str, dst: Path, seed: int, num_classes: int, overwrite: bool) -> None:
    """Write a deterministic random checkpoint (norms and GRN perturbed away from identity)."""
    from convnextv2.fixtures import write_fixture

    ckpt = write_fixture(dst, variant=variant, fmt=fmt, seed=seed, overwrite=overwrite, num_classes=num_classes)
    click.echo(f"wrote {dst} ({fmt}, {ckpt.config.variant}, seed {seed}, {ckpt.parameter_count:,} parameters)")
