"""The toolkit's own error types, at the bottom layer so every layer can raise them. The CLI maps them to
exit codes (README, "Exit codes")."""

from __future__ import annotations


class ConvNeXtV2Error(Exception):
    """Base of every error the toolkit raises on purpose."""

    exit_code = 2


class BadInputError(ConvNeXtV2Error):
    """The input (file, option, config) is wrong; exit code 2."""


class UnsafeCheckpointError(BadInputError):
    """A checkpoint asks for something that could run code (a pickled global we do not allow)."""


class SchemaError(BadInputError):
    """A tensor set does not match the canonical schema for its config; lists every problem at once."""

    def __init__(self, where: str, problems: list[str]):
        self.where = where
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{where}: {len(problems)} problem(s) with the tensors:\n{lines}")


class MissingDependencyError(ConvNeXtV2Error):
    """A command needs a framework that is not installed."""


class CheckFailedError(ConvNeXtV2Error):
    """A check ran and failed (parity outside tolerance, mismatch); exit code 1."""

    exit_code = 1
