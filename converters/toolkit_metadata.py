"""Our canonical metadata carried inside a foreign-layout safetensors file (transformers', timm's).

It rides along in the file's ``__metadata__`` under ``EMBEDDED_PREFIX`` (not as the canonical ``schema``
key, so the file is never mistaken for a canonical one): reading it back restores the exact preprocessing,
source and info, which makes hf -> canonical -> hf and timm -> canonical -> timm byte-identical.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from convnextv2.converters.checkpoint import Checkpoint, checkpoint_from_metadata
from convnextv2.converters.digests import deferred_digests
from convnextv2.reference import schema
from convnextv2.reference.errors import BadInputError

# safetensors metadata keys under which our canonical metadata is embedded in foreign-layout files.
EMBEDDED_PREFIX = "convnextv2-toolkit."


def embedded_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """Our canonical metadata under EMBEDDED_PREFIX; a source digest still pending stays a placeholder that
    ``write_safetensors`` fills in while it streams the tensors (see ``deferred_digests``)."""
    with deferred_digests():
        meta = ckpt.metadata()
    meta.pop("format", None)
    return {EMBEDDED_PREFIX + key: value for key, value in meta.items()}


def restore_embedded(meta: Mapping[str, str], where: str) -> dict[str, Any] | None:
    """Our canonical metadata embedded by ``embedded_metadata``, parsed; None when absent or not ours."""
    if meta.get(EMBEDDED_PREFIX + "schema") != schema.SCHEMA_NAME:
        return None
    fields = {key[len(EMBEDDED_PREFIX):]: value for key, value in meta.items() if key.startswith(EMBEDDED_PREFIX)}
    try:
        ckpt = checkpoint_from_metadata(fields, {}, f"{where}: embedded toolkit metadata")
        return {"config": ckpt.config, "preprocessing": ckpt.preprocessing, "source": ckpt.source, "info": ckpt.info}
    except BadInputError as exc:
        warnings.warn(f"{where}: embedded toolkit metadata is unreadable ({exc}); ignoring it",
                      RuntimeWarning, stacklevel=3)
        return None
