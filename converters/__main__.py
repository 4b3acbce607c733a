"""``python -m convnextv2.converters`` runs the CLI (same as the ``convnextv2`` console script)."""

from convnextv2.converters.cli import main

main(prog_name="convnextv2")
