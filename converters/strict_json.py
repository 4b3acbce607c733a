"""JSON read from untrusted files: duplicate keys, deep nesting and huge numbers fail with BadInputError.

``json.loads`` keeps the last of two equal keys silently (two readers could then see two different files),
raises RecursionError on deep nesting and ValueError on huge integers; every header, metadata field and
config file the toolkit reads goes through :func:`parse_json_text` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convnextv2.reference.errors import BadInputError

# A config.json with 1000 labels is ~60 KB; refuse absurd ones before reading them.
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadInputError(f"duplicate key {key!r} in the JSON header")
        result[key] = value
    return result


def parse_json_text(text: bytes | str, what: str) -> Any:
    """``json.loads`` that fails with BadInputError only: duplicate keys, deep nesting, huge numbers."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_keys)
    except BadInputError as exc:
        raise BadInputError(f"{what}: {exc}") from None
    except RecursionError:
        raise BadInputError(f"{what} nests too deeply to be a header") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError and int-digit limits are ValueErrors
        raise BadInputError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def load_json(path: Path) -> dict[str, Any]:
    """A small JSON object file (config.json and friends), size-bounded, duplicate keys refused."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise BadInputError(f"{path}: {size} bytes is too large for a config file (limit {MAX_CONFIG_BYTES})")
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc})") from None
    data = parse_json_text(raw, str(path))
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object")
    return data
