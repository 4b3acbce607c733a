"""Placeholders for the pickled objects a checkpoint reader does not construct.

A training checkpoint holds, beside its weights, other libraries' objects (mmengine's ``HistoryBuffer``, numpy
scalars, optimizer state). The safe torch-zip reader (converters/torchzip.py) resolves each such global to a
class of its own making, :class:`Inert`: nothing of the named module is imported, nothing of it constructed or
called, and the arguments and state the file gives it are dropped. Globals that can only mean running code
are refused by name instead, so a planted payload is reported rather than quietly read past.
"""

from __future__ import annotations

import collections
from typing import Any

from convnextv2.reference.errors import UnsafeCheckpointError


class Inert:
    """Stands in for an object of a class this reader does not construct; ``pickled_global`` names the class
    or function the file asked for. Built without calling anything; arguments, state and items are dropped."""

    pickled_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.pickled_global}, not loaded>"


def inert_class(module: str, name: str) -> type[Inert]:
    # A class (not an instance): NEWOBJ accepts only a type, and REDUCE then "calls" our harmless constructor.
    return type("Inert", (Inert,), {"pickled_global": f"{module}.{name}", "__slots__": ()})


# Modules whose globals can only mean running code, reading files or loading more pickles: refused by name
# rather than made inert, so that a planted payload is reported, not quietly read past.
CODE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "builtins", "__builtin__", "importlib", "sys", "runpy", "shutil", "socket",
    "pickle", "_pickle", "marshal", "ctypes", "types", "code", "codeop", "pty", "webbrowser", "multiprocessing",
    "threading", "_thread", "signal", "operator", "functools", "io", "_io", "tempfile", "pathlib", "glob",
    "zipimport", "asyncio", "inspect", "gc", "torch", "_codecs", "codecs", "commands", "popen2", "platform",
    "dill", "cloudpickle", "joblib", "numpy.lib.npyio", "numpy.testing", "pydoc", "timeit", "trace", "pdb",
})


def is_code_module(module: str) -> bool:
    return module.split(".")[0] in CODE_MODULES or module in CODE_MODULES


def is_inert(obj: Any) -> bool:
    """A placeholder: an object built in place of one, or the stand-in class itself (a class or function the
    file named as a value, e.g. the functions mmengine's ``HistoryBuffer`` keeps in its state)."""
    return isinstance(obj, Inert) or (isinstance(obj, type) and issubclass(obj, Inert))


def inert_attribute(owner: Any, name: Any) -> type[Inert]:
    """What ``builtins.getattr`` means in a checkpoint's pickle: below protocol 4, pickle names a method or a
    nested class as ``getattr(Class, "name")`` (mmengine's ``HistoryBuffer`` state holds ``HistoryBuffer.min``
    that way). Allowed only on a placeholder, and answered with another one: nothing of the real class is
    reached. On anything else (a module brought in some other way, our own stand-ins) it is refused."""
    if not (is_inert(owner) and isinstance(name, str)):
        raise UnsafeCheckpointError(
            f"refusing pickled global builtins.getattr applied to a {type(owner).__name__}: it could run code. "
            "Only a placeholder's attributes are named this way; nothing was executed")
    return inert_class(owner.pickled_global, name)


def inert_globals(obj: Any) -> collections.Counter[str]:
    """How many placeholders of each global ``obj`` holds (plain data walked; placeholders are leaves)."""
    found: collections.Counter[str] = collections.Counter()
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if is_inert(item):
            found[item.pickled_global] += 1
        elif isinstance(item, (dict, list, tuple, set, frozenset)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
            if isinstance(item, dict):
                stack.extend(item.keys())
    return found


__all__ = ["CODE_MODULES", "Inert", "inert_attribute", "inert_class", "inert_globals", "is_code_module", "is_inert"]
