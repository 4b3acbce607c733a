"""``convnextv2 variants``, ``inspect``, ``convert`` and ``fixture``: the checkpoint commands (docs/cli.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

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
    from convnextv2.reference.schema import variant_table

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
@click.option("--revision", default=None, metavar="NAME",
              help="huggingface_hub cache folders (models--ORG--NAME): the branch, tag or commit to read "
                   "(default: main).")
@choices.prefix_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, fmt: str, ema: bool, revision: str | None, prefix: str | None, as_json: bool) -> None:
    """Describe a checkpoint: format, family and naming, where it sat in a wrapper, size, classes, parameters,
    dtype, metadata."""
    from convnextv2 import converters
    from convnextv2.converters import families
    from convnextv2.converters.state_files import skipped_text
    from convnextv2.converters.wrapped import left_behind_text

    ckpt = converters.load(path, format=fmt, **choices.read_options(ema, revision, prefix))
    data = ckpt.describe()
    data["path"] = str(path)
    found = families.form(ckpt)
    data.update(found)
    pre = ckpt.preprocessing
    source = ckpt.source
    layout = source.layout.get("layout") if source.format == data["format"] else None
    # The wrapper and the skipped entries are the source's record: this file's own where the file is its own
    # source (same digest), otherwise said to be of the file it was converted from.
    own = source.format == data["format"] and (source.sha256 == data["sha256"] or
                                               (path.is_dir() and source.file_name == path.name))
    of_source = "" if own else f" (in the source {source.file_name or '-'})"
    lines = [
        f"path         {path}",
        f"format       {data['format']}" + (f" ({layout})" if layout else ""),
        f"family       {found['family']}",
    ]
    if found["naming"]:
        lines.append(f"naming       {found['naming']}")
    if found["prefix"]:
        behind = found["left_behind"]
        lines.append(f"wrapper      under {found['prefix']!r}" + (
            f"; left behind {sum(behind.values())} tensor(s): {left_behind_text(behind)}" if behind
            else "; nothing left behind") + of_source)
    if found["skipped"]:
        lines.append(f"skipped      {skipped_text(found['skipped'])}{of_source}")
    lines += [
        f"sha256       {data['sha256'] or '-'}",
        f"variant      {data['variant']}  depths={data['depths']} dims={data['dims']}",
        f"classes      {data['num_classes'] or 'none (headless)'}"
        + ("" if data["head_norm"] else ", no final norm"),
        f"parameters   {data['parameters']:,}  dtype {data['dtype']}",
        f"input        {pre.input_size}px, crop_pct {pre.crop_pct} ({pre.crop_mode}), {pre.interpolation}, "
        f"mean {list(pre.mean)}, std {list(pre.std)}  [{PREPROCESSING_ORIGIN_TEXT[pre.origin]}]",
        f"source       {source.format} {source.file_name or '-'} sha256 {source.sha256 or '-'}",
    ]
    if data["extras"]:
        lines.append(f"extras       {data['extras']} tensors kept verbatim under extras.*")
    info = {k: v for k, v in ckpt.info.items() if k != "skipped"}  # skipped has its own line
    if info:
        lines.append(f"info         {json.dumps(info, default=str)[:200]}")
    _emit(data, as_json, lines)


PREPROCESSING_ORIGIN_TEXT = {
    "read": "read from the file",
    "assumed": "assumed: the file states none",
    "set": "set at a conversion",
}


def _floats3(name: str) -> Any:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, float, float] | None:
        if value is None:
            return None
        try:
            numbers = tuple(float(x) for x in value.split(","))
        except ValueError:
            raise click.BadParameter(f"expected three comma-separated numbers, got {value!r}") from None
        if len(numbers) != 3 or not all(np.isfinite(numbers)):
            raise click.BadParameter(f"expected three finite comma-separated numbers (R,G,B), got {value!r}")
        if name == "std" and not all(x > 0 for x in numbers):
            raise click.BadParameter(f"every std must be positive, got {value!r}")
        return numbers  # type: ignore[return-value]
    return parse


def _check_input_size(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and (value < 32 or value % 32):
        raise click.BadParameter(f"must be a positive multiple of 32 (the model downsamples by 32), got {value}")
    return value


def _check_crop_pct(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise click.BadParameter(f"must be in (0, 1], got {value}")
    return value


INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash")


def preprocessing_options(command: Any) -> Any:
    """--input-size, --crop-pct, --interpolation, --crop-mode, --mean, --std: state the checkpoint's
    preprocessing at a conversion (recorded with origin "set")."""
    for option in reversed([
        click.option("--input-size", type=int, default=None, callback=_check_input_size,
                     help="Preprocessing: image size the checkpoint expects (multiple of 32)."),
        click.option("--crop-pct", type=float, default=None, callback=_check_crop_pct,
                     help="Preprocessing: centre-crop fraction in (0, 1] (1.0: no crop)."),
        click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=None,
                     help="Preprocessing: resize interpolation."),
        click.option("--crop-mode", type=click.Choice(CROP_MODES), default=None,
                     help="Preprocessing: center (resize the short side, crop) or squash (resize both sides)."),
        click.option("--mean", default=None, callback=_floats3("mean"), help="Preprocessing: per-channel mean R,G,B."),
        click.option("--std", default=None, callback=_floats3("std"), help="Preprocessing: per-channel std R,G,B."),
    ]):
        command = option(command)
    return command


PREPROCESSING_KEYS = ("input_size", "crop_pct", "interpolation", "crop_mode", "mean", "std")


def apply_preprocessing(ckpt: Any, given: dict[str, Any]) -> None:
    """The preprocessing options the user gave, over what was read; origin "set" when any was given."""
    import dataclasses

    values = {key: given[key] for key in PREPROCESSING_KEYS if given.get(key) is not None}
    if values:
        ckpt.preprocessing = dataclasses.replace(ckpt.preprocessing, **values).with_origin("set")


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path), help="Destination path.")
@click.option("--to", "to_format", required=True, type=choices.TO, help="Output format.")
@click.option("--from", "from_format", type=choices.FROM, default="auto", show_default=True,
              help="Format of SRC (auto: detected by content).")
@click.option("--variant", default=None, help="Expected size (atto..huge or custom:...); cross-checked against the shapes.")
@click.option("--ema", is_flag=True, help="Original checkpoints: convert model_ema instead of model.")
@click.option("--revision", default=None, metavar="NAME",
              help="huggingface_hub cache folders (models--ORG--NAME): the branch, tag or commit to read "
                   "(default: main).")
@choices.prefix_option
@click.option("--layout", type=choices.ORIGINAL_LAYOUT, default=None,
              help="--to original: which original layout (default: the source's, else finetuned/fcmae).")
@click.option("--overwrite", is_flag=True, help="Replace an existing destination (atomically).")
@click.option("--source-digest/--no-source-digest", default=True, show_default=True,
              help="Record SRC's sha256 in the output's metadata. It costs one more read of SRC, hashed on a "
                   "second core while the tensors stream (the Huge file: about 1.4 s of CPU). A digest SRC "
                   "already carries from an earlier conversion is always kept.")
@click.option("--verify", is_flag=True,
              help="Run SRC by its own runtime and the output (read back) by its own, on seeded images, against "
                   "the float64 PyTorch referee; write only if both pass the parity rule. Always on for ONNX SRC.")
@click.option("--strict", is_flag=True,
              help="Refuse (exit 1, nothing written) when the target cannot carry something SRC holds, instead "
                   "of warning.")
@click.option("--no-cache", is_flag=True,
              help="Keep no export template: build an ONNX, OpenVINO, LiteRT or ExecuTorch export afresh (default: "
                   "from its architecture's template under $XDG_CACHE_HOME/convnextv2, the same file; docs/deploy.md).")
@preprocessing_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def convert(src: Path, dst: Path, to_format: str, from_format: str, variant: str | None, ema: bool,
            revision: str | None, prefix: str | None, layout: str | None, overwrite: bool, source_digest: bool, verify: bool, strict: bool, no_cache: bool, as_json: bool,
            **preprocessing: Any) -> None:
    """Convert SRC to another format, writing DST atomically.

    Every output is read back by its own reader and compared bit for bit with what was meant to be written
    before it is published; a difference is exit 1 with nothing written."""
    from convnextv2 import converters
    from convnextv2.converters.fs_faults import check_destination
    from convnextv2.converters.runners import gates

    check_destination(dst, overwrite)  # fail before reading a large source
    if layout is not None and to_format != "original":
        raise click.UsageError("--layout applies only to --to original")
    ckpt = converters.load(src, format=from_format, variant=variant, **choices.read_options(ema, revision, prefix))
    choices.say_notes(ckpt)
    if not source_digest and ckpt.source.pending_digest() is not None:
        ckpt.source.sha256 = ""
    summary: dict[str, Any] = {"source": str(src), "from": ckpt.file.format if ckpt.file else ckpt.source.format,
                               "notes": list(ckpt.notes)}
    if summary["from"] == "onnx":
        # An ONNX graph is read by recognising its operators; running it is the proof that the tensors
        # recovered compute what the graph computes.
        summary["onnx_import"] = gates.onnx_import(ckpt, src)
    apply_preprocessing(ckpt, preprocessing)
    options: dict[str, Any] = {"overwrite": overwrite}
    if layout is not None:
        options["layout"] = layout
    from convnextv2.converters.entry_cache import EntryCache

    result = converters.save(ckpt, dst, format=to_format, strict=strict, verify=verify,
                             templates=None if no_cache else EntryCache.default(),
                             warn=lambda m: click.echo(f"warning: {m}", err=True), **options)
    summary.update({"output": str(dst), "to": to_format, "variant": ckpt.config.variant,
                    "num_classes": ckpt.config.num_classes, "parameters": ckpt.parameter_count,
                    "preprocessing": {**ckpt.preprocessing.to_json_dict(), "origin": ckpt.preprocessing.origin},
                    **result})
    back = result["read_back"]
    lines = [f"wrote {dst} ({to_format}, {ckpt.config.variant}, {ckpt.parameter_count:,} parameters)",
             "read back: " + (f"{back['tensors']} tensors ({back['bytes']:,} bytes) identical bit for bit"
                              if back["status"] == "exact" else "not readable (the format cannot be read back)")]
    if "onnx_import" in summary:
        check = summary["onnx_import"]
        lines.append(f"onnx import: {check['runner']} vs the tensors read: {check['feature']} max|d| "
                     f"{check['max_abs']:.3g} <= {check['tolerance']:.3g}")
    if "verify" in result:
        for side in ("source", "output"):
            check = result["verify"][side]
            lines.append(f"verify {side}: {check['runner']}: {check['feature']} max|d| {check['max_abs']:.3g} "
                         f"<= {check['tolerance']:.3g} vs the float64 referee")
    _emit(summary, as_json, lines)


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
