"""Which model family and naming a state dict is closest to, for a refusal that helps (placeholder: being
written)."""

from __future__ import annotations

from convnextv2.reference.errors import BadInputError, UnplacedKeysError


def explain(error: UnplacedKeysError) -> BadInputError:
    return error
