"""Bidirectional key rewrite tables: each format writes one table of (foreign, canonical) templates.

Templates use ``{name}`` placeholders: ``{s}``/``{b}``/``{i}`` match integers, ``{p}`` a parameter name.
The same table drives both directions, so a rewrite cannot be fixed in one direction and not the other;
each rule also names the tensor's layout change (a ``reference.layouts.Layout``), which has both directions too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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
