"""``convnextv2 parity``: run a checkpoint on several runtimes, and any deployment files made from it
(``--artifact``), and compare each, stage by stage, with a float64 PyTorch referee. Exit 0 pass, 1 parity failure
(or an artifact that cannot be run here), 2 bad input or usage (including a runtime asked for by name that cannot
run here, and an artifact that cannot be read)."""

from __future__ import annotations

from pathlib import Path

import click

from convnextv2.converters.cli import choices
from convnextv2.reference import parity_rule
from convnextv2.reference.errors import BadInputError, CheckFailedError


def _split(values: tuple[str, ...]) -> list[str]:
    from convnextv2.converters.runners import registry

    # Each runner's record lists the other names it answers to (tf -> tensorflow, hf -> transformers-pt, ...).
    aliases = {alias: entry.name for entry in registry.REGISTRY.values() for alias in entry.record.aliases}
    names: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip().lower()
            if part:
                names.append(aliases.get(part, part))
    return list(dict.fromkeys(names))


def _select(values: tuple[str, ...], kind: str, default_all: bool) -> tuple[list[str], bool]:
    """(names, explicit). Names given one by one are explicit: each must be able to run (else exit 2). 'all' and
    the default are not: whatever cannot run here is listed as not available and the rest run."""
    from convnextv2.parity_tests import runtimes

    known = runtimes.runtime_names(kind)
    names = _split(values)
    if not names:
        return (known if default_all else []), False
    if names == ["none"]:
        return [], True
    if names == ["all"]:
        return known, False
    unknown = [n for n in names if n not in known]
    if unknown:
        what = "--runtimes" if kind == "runtime" else "--peers"
        raise BadInputError(f"{what}: unknown {', '.join(unknown)}; expected some of {', '.join(known)}, or all")
    return names, True


@click.command(short_help="Compare every runtime with a float64 PyTorch referee.")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--from", "fmt", type=choices.FROM, default="auto", show_default=True,
              help="Format of SRC (auto: detected by content).")
@click.option("--ema", is_flag=True, help="Original checkpoints: check model_ema instead of model.")
@click.option("--revision", default=None, metavar="NAME",
              help="huggingface_hub cache folders (models--ORG--NAME): the branch, tag or commit to read "
                   "(default: main).")
@choices.prefix_option
@click.option("--runtimes", "runtime_values", multiple=True, metavar="LIST",
              help="torch, tensorflow, flax, onnxruntime, openvino, litert, executorch (comma-separated or repeated; 'all' = default: every "
                   "installed one, the others listed as not available; 'none').")
@click.option("--peers", "peer_values", multiple=True, metavar="LIST",
              help="Independent implementations to compare too: timm, transformers-pt, transformers-tf "
                   "(comma-separated or repeated; 'all' = every one, those that cannot run here listed as not "
                   "available).")
@click.option("--artifact", "artifact_paths", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="A deployment file made by any tool (ONNX, .tflite, OpenVINO .xml, .pte, .keras, SavedModel "
                   "folder, .pt2; TensorRT and Core ML are reported unavailable where they cannot run), run in its "
                   "own runtime and judged against SRC (repeatable; with --runtimes none the artifacts alone). Its "
                   "conventions and precision are found, not assumed: docs/parity.md \"Artifacts\".")
@click.option("--artifact-layout", type=click.Choice(["NCHW", "NHWC"]), default=None,
              help="Pin the artifacts' input layout (default: from the signature).")
@click.option("--artifact-input", "artifact_input", type=click.Choice(["normalized", "unit", "byte"]), default=None,
              help="Pin what the artifacts take: normalized (mean/std applied outside), unit (RGB in [0, 1], "
                   "normalisation in the graph) or byte (RGB in [0, 255]) (default: tried against the referee).")
@click.option("--artifact-output", type=click.Choice(["logits", "probabilities", "pooled"]), default=None,
              help="Pin what the artifacts output (default: tried against the referee).")
@click.option("--artifact-precision", type=click.Choice(["float32", "float16", "bfloat16", "int8"]), default=None,
              help="Pin the precision the artifacts are judged at (default: found in the file).")
@click.option("--image-size", type=int, default=None, help="Input size in pixels (default: the checkpoint's).")
@click.option("--batch", type=int, default=parity_rule.DEFAULT_BATCH, show_default=True,
              help="Number of seeded random images (the parity rule's default, docs/parity.md).")
@click.option("--seed", type=int, default=parity_rule.DEFAULT_SEED, show_default=True,
              help="Seed of the random images (the same seed gives the same images on every machine).")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help="Use the image files in DIR (put through the checkpoint's preprocessing) instead of random ones.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(list(parity_rule.PRECISIONS)),
              help="Precision(s) to run the runtimes in (repeatable; default float32). bfloat16/float16 are judged "
                   "against the PyTorch reference at that precision with its norms in float32; a runtime that "
                   "cannot run a precision is listed as not available at it.")
@click.option("--atol", multiple=True, metavar="[DTYPE=]X",
              help="Absolute tolerance; replaces the derived rule. Per dtype: --atol float64=1e-12.")
@click.option("--rtol", multiple=True, metavar="[DTYPE=]X",
              help="Tolerance relative to the feature's largest |referee| value (scale-aware), with --atol.")
@click.option("--report", "reports", multiple=True, type=click.Path(path_type=Path),
              help="Write a report; the extension picks the kind: .json .md .xml (JUnit) .html .png.")
@click.option("--overwrite", is_flag=True, help="Replace existing report files.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--no-cache", is_flag=True,
              help="Build every export and the referee afresh, keeping nothing (default: reuse and keep them under "
                   "$XDG_CACHE_HOME/convnextv2, keyed by the checkpoint's bytes, the images and the toolkit).")
@click.option("--jobs", type=click.IntRange(min=1), default=None, metavar="N",
              help="Worker processes running the runtimes side by side, while the referee is computed (default: "
                   "one per core, as memory allows; $CONVNEXTV2_PARITY_JOBS; 1: all in this process).")
def parity(src: Path, fmt: str, ema: bool, revision: str | None, prefix: str | None, runtime_values: tuple[str, ...],
           peer_values: tuple[str, ...], artifact_paths: tuple[Path, ...], artifact_layout: str | None,
           artifact_input: str | None, artifact_output: str | None, artifact_precision: str | None,
           image_size: int | None, batch: int, seed: int, images_dir: Path | None, dtypes: tuple[str, ...],
           atol: tuple[str, ...], rtol: tuple[str, ...], reports: tuple[Path, ...], overwrite: bool,
           as_json: bool, no_cache: bool, jobs: int | None) -> None:
    """Check SRC on every runtime against a float64 PyTorch referee, stage by stage.

    The default tolerance is derived from the PyTorch float32 error in the same run (6x, scale-aware,
    per stage); see docs/parity.md.
    """
    import json
    import time

    from convnextv2.parity_tests.workers import passive_openmp

    # Before any framework loads OpenMP: the referee's threads would otherwise spin while they wait.
    passive_openmp()
    from convnextv2 import converters
    from convnextv2.converters.fs_faults import check_destination
    from convnextv2.parity_tests import runtimes
    from convnextv2.parity_tests.cache import ParityCache, process_age
    from convnextv2.parity_tests.harness import parse_tolerances, run_parity

    started = process_age()
    from convnextv2.parity_tests.report import check_report_paths, terminal_table, write_report

    # Everything a user can get wrong is checked before any model runs.
    runtime_names, runtimes_explicit = _select(runtime_values, "runtime", default_all=True)
    peer_names, peers_explicit = _select(peer_values, "peer", default_all=False)
    selected = runtime_names + peer_names
    if not selected and not artifact_paths:
        raise BadInputError("nothing to compare: --runtimes none, no --peers and no --artifact")
    for path in artifact_paths:
        if not path.exists():
            raise BadInputError(f"--artifact {path}: no such file or directory")
    explicit = (set(peer_names) if peers_explicit else set()) | (set(runtime_names) if runtimes_explicit else set())
    for name in selected:
        if name in explicit:
            reason = runtimes.get(name).availability()
            if reason is not None:
                what = "--peers: peer" if name in peer_names else "runtime"
                raise BadInputError(f"{what} {name} is not available: {reason}")
    atol_by_dtype = parse_tolerances(list(atol), "--atol")
    rtol_by_dtype = parse_tolerances(list(rtol), "--rtol")
    report_paths = list(reports)
    check_report_paths(report_paths)
    for path in report_paths:
        check_destination(path, overwrite)
    if batch < 1:
        raise BadInputError(f"--batch must be at least 1, got {batch}")
    if images_dir is not None and not images_dir.is_dir():
        raise BadInputError(f"--images {images_dir}: not a directory")

    loading = time.perf_counter()
    ckpt = converters.load(src, format=fmt, **choices.read_options(ema, revision, prefix))
    choices.say_notes(ckpt)
    loaded = time.perf_counter() - loading

    def say(message: str) -> None:
        click.echo(f"  {message}", err=True)

    pins = None
    if artifact_paths:
        from convnextv2.converters.runners.artifact import Pins

        pins = Pins(layout=artifact_layout, input_range=artifact_input, output=artifact_output,
                    precision=artifact_precision)
    cache = ParityCache(None) if no_cache else ParityCache.default()
    try:
        report = run_parity(ckpt, selected, dtypes=list(dtypes) or ["float32"], image_size=image_size, batch=batch,
                            seed=seed, images_dir=images_dir, atol=atol_by_dtype, rtol=rtol_by_dtype,
                            checkpoint_path=str(src), progress=say, cache=cache, jobs=jobs,
                            artifacts=list(artifact_paths), artifact_pins=pins)
    finally:
        cache.close()
    # The run's own time outside the runtimes: interpreter start and the command line's imports, the read.
    report.timings = {"startup": started, "load": loaded, **report.timings}
    writing = time.perf_counter()
    for path in report_paths:
        write_report(report, path, overwrite=overwrite)
    report.timings["reports"] = time.perf_counter() - writing
    if as_json:
        click.echo(json.dumps(report.to_json_dict(), indent=2, sort_keys=True))
    else:
        click.echo(terminal_table(report))
    for path in report_paths:
        click.echo(f"wrote {path}", err=True)
    if not report.passed:
        failed = ", ".join([*(f"{r.name} ({r.status}{', first diverges at ' + r.first_divergence if r.first_divergence else ''})"
                              for r in report.failures()),
                            *(f"{r.name} (not checked: {r.reason})" for r in report.unchecked())]) or "no runtime could run"
        raise CheckFailedError(f"parity failed: {failed}")
