"""Bidirectional key rewrite tables: each format writes one table of (foreign, canonical) templates.

Templates use ``{name}`` placeholders: ``{s}``/``{b}``/``{i}`` match integers, ``{p}`` a parameter name.
The same table drives both directions, so a rewrite cannot be fixed in one direction and not the other;
each rule also names the tensor's layout change (a ``reference.layouts.Layout``), which has both directions too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from convnextv2.reference.errors import BadInputError
from convnextv2.reference.layouts import IDENTITY, Layout

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_PATTERNS = {"p": r"[A-Za-z_]\w*"}


def _compile(template: str) -> re.Pattern[str]:
    parts, last = [], 0
    for match in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[last: match.start()]))
        name = match.group(1)
        parts.append(f"(?P<{name}>{_PATTERNS.get(name, r'[0-9]+')})")
        last = match.end()
    parts.append(re.escape(template[last:]))
    return re.compile("^" + "".join(parts) + "$")


@dataclass(frozen=True)
class Rule:
    foreign: str
    canonical: str
    # How the tensor's layout changes between the canonical and the foreign array.
    transform: Layout = IDENTITY


class KeyTable:
    def __init__(self, rules: Sequence[Rule]):
        self.rules = list(rules)
        self._to_canonical = [(_compile(r.foreign), r) for r in self.rules]
        self._to_foreign = [(_compile(r.canonical), r) for r in self.rules]

    def to_canonical(self, key: str) -> tuple[str, Rule] | None:
        for pattern, rule in self._to_canonical:
            match = pattern.match(key)
            if match:
                return rule.canonical.format(**match.groupdict()), rule
        return None

    def to_foreign(self, key: str) -> tuple[str, Rule] | None:
        for pattern, rule in self._to_foreign:
            match = pattern.match(key)
            if match:
                return rule.foreign.format(**match.groupdict()), rule
        return None

    def to_foreign_tensors(self, tensors: Mapping[str, Any], target: str) -> list[tuple[str, Rule, Any]]:
        """Every canonical tensor under its foreign name and in its foreign layout, in ``tensors``' order, with
        the rule that placed it; a tensor the table has no place for is refused (``target``: "the timm layout")."""
        placed = []
        for name, array in tensors.items():
            mapped = self.to_foreign(name)
            if mapped is None:
                raise BadInputError(f"tensor {name} has no place in {target}")
            key, rule = mapped
            placed.append((key, rule, rule.transform.to_foreign(array)))
        return placed
