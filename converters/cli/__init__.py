"""The ``convnextv2`` command line: the one package that sits on top of the others (docs/architecture.md).

Every command lives in the module of its family and is added to the group here:

* ``checkpoints``: ``variants``, ``inspect``, ``convert``, ``fixture``
* ``export_onnx``: ``export-onnx``
* ``parity``: ``parity``
* ``demo``: ``demo``

Exit codes (docs/cli.md): 0 success; 1 a check ran and failed (parity, verification); 2 bad input or
usage (unreadable, unsafe or malformed checkpoint, wrong option, existing output without --overwrite); 3 the
machine refused a write (full disk or quota, read-only filesystem, permission, a vanished directory); 128+N
ended by signal N (SIGINT 130, SIGTERM 143, SIGHUP 129) with every temporary removed. Any other code is a bug
in the toolkit. Commands import only the framework they use, inside the command.
Nothing but tests and ``python -m convnextv2.converters`` imports this package.
"""

from __future__ import annotations

from typing import Any

import click

from convnextv2.converters.cli import checkpoints, demo, export_onnx, parity, signals
from convnextv2.converters.fs_faults import environment_fault
from convnextv2.reference.errors import ConvNeXtV2Error, Interrupted


class ToolkitGroup(click.Group):
    """Turns the toolkit's own errors, the machine's refusals (OSError) and SIGINT/SIGTERM/SIGHUP into a
    one-line message and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        with signals.handling_signals():
            try:
                return super().invoke(ctx)
            except ConvNeXtV2Error as exc:
                click.echo(f"error: {exc}", err=True)
                ctx.exit(exc.exit_code)
            except Interrupted as exc:
                click.echo(f"error: {exc.describe()}", err=True)
                ctx.exit(exc.exit_code)
            except KeyboardInterrupt:  # Ctrl-C before the handlers were in place
                click.echo("error: interrupted by SIGINT", err=True)
                ctx.exit(130)
            except OSError as exc:
                fault = environment_fault(exc)
                if fault is None:
                    raise
                click.echo(f"error: {fault}", err=True)
                ctx.exit(fault.exit_code)


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convnextv2-toolkit")
def main() -> None:
    """Convert and validate ConvNeXt V2 checkpoints across PyTorch, TensorFlow, Flax and ONNX."""


for _command in (checkpoints.variants, checkpoints.inspect, checkpoints.convert, checkpoints.fixture,
                 export_onnx.export_onnx, parity.parity, demo.demo):
    main.add_command(_command)

__all__ = ["ToolkitGroup", "main"]
