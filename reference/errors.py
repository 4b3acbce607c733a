"""The toolkit's own error types, at the bottom layer so every layer can raise them. The CLI maps them to
exit codes (README, "Exit codes")."""

from __future__ import annotations

from typing import Any


class ConvNeXtV2Error(Exception):
    """Base of every error the toolkit raises on purpose."""

    exit_code = 2


class BadInputError(ConvNeXtV2Error):
    """The input (file, option, config) is wrong; exit code 2."""


class UnsafeCheckpointError(BadInputError):
    """A checkpoint asks for something that could run code (a pickled global we do not allow)."""


class UnplacedKeysError(BadInputError):
    """A state dict has keys a format's naming does not place. Carries every key (with its shape), so that the
    reading entry point can say which family and naming the file is closest to (converters/families.py)."""

    def __init__(self, where: str, naming: str, keys: dict[str, tuple[int, ...]], unplaced: list[str], message: str):
        self.where = where
        self.naming = naming
        self.keys = keys
        self.unplaced = unplaced
        super().__init__(message)

    @classmethod
    def in_state(cls, where: str, naming: str, state: Any, unplaced: list[str], not_in: str) -> UnplacedKeysError:
        """The refusal of a reader whose table leaves ``unplaced`` keys of ``state`` (a name -> array mapping);
        ``not_in`` says what they are not in ("the finetuned layout")."""
        shapes = {str(k): tuple(getattr(v, "shape", ())) for k, v in state.items()}
        return cls._listing(where, naming, shapes, unplaced, not_in)

    @classmethod
    def _listing(cls, where: str, naming: str, shapes: dict[str, tuple[int, ...]], unplaced: list[str],
                 not_in: str) -> UnplacedKeysError:
        shown = ", ".join(f"{key} {list(shapes.get(key, ()))}" for key in unplaced[:10])
        error = cls(where, naming, shapes, unplaced, f"{where}: {len(unplaced)} key(s) not in {not_in}: {shown}")
        error.not_in = not_in
        return error

    not_in: str = ""

    def in_file_names(self, names: dict[str, str]) -> UnplacedKeysError:
        """The same refusal in the file's own key names (``names``: the name a reader saw -> the file's, for a
        model read from under a wrapper prefix), so that what it quotes can be found in the file."""
        if not self.not_in or not names:
            return self
        shapes = {names.get(k, k): shape for k, shape in self.keys.items()}
        return self._listing(self.where, self.naming, shapes, [names.get(k, k) for k in self.unplaced], self.not_in)


class SchemaError(BadInputError):
    """A tensor set does not match the canonical schema for its config; lists every problem at once."""

    def __init__(self, where: str, problems: list[str]):
        self.where = where
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{where}: {len(problems)} problem(s) with the tensors:\n{lines}")


class MissingDependencyError(ConvNeXtV2Error):
    """A command needs a framework that is not installed."""


class PrecisionUnavailableError(MissingDependencyError):
    """The runtime is installed but this machine cannot run it at the precision asked for (a CPU without
    bfloat16 units): the runtime is not available at that precision here, which is not a parity failure."""


class CheckFailedError(ConvNeXtV2Error):
    """A check ran and failed (parity outside tolerance, mismatch); exit code 1."""

    exit_code = 1


class EnvironmentFaultError(ConvNeXtV2Error):
    """The machine refused a write the input and options were fine for: a full disk or quota, a read-only
    filesystem, a permission, a destination directory that vanished; exit code 3. Nothing was written."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; raised in the main thread so every ``finally`` block (temporary
    files and folders) runs. A KeyboardInterrupt, so code that already treats Ctrl-C as "stop now" (the
    standard library's subprocess helpers kill their child) treats the other signals alike.

    ``writing`` holds the destinations being written when it arrived, ``written`` those already complete."""

    def __init__(self, signum: int, writing: tuple[str, ...] = (), written: tuple[str, ...] = ()):
        import signal

        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.writing = writing
        self.written = written
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self) -> str:
        if self.writing:
            message = f"interrupted by {self.signal_name} while writing {', '.join(self.writing)}; nothing was written"
        else:
            message = f"interrupted by {self.signal_name}"
            if not self.written:
                message += "; nothing was written"
        if self.written:
            message += f" (already complete: {', '.join(self.written)})"
        return message
