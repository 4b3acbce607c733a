"""What every runtime is compared on: the stage features, in forward order, and which of them is the model's final
output. The one home of these names; the models, the exports, the runners and the parity rule take them from here.
"""

from __future__ import annotations

from typing import Protocol

# The spatial stage outputs (NCHW) then the pooled features (B, C) and the logits (B, K), in forward order: the
# first one that fails is where a runtime diverges.
SPATIAL_FEATURES = ("stem", "stage1", "stage2", "stage3", "stage4")
FEATURES = (*SPATIAL_FEATURES, "pooled", "logits")
# What the backbone computes without the classifier: every model's feature dict holds these.
BACKBONE_FEATURES = FEATURES[:-1]


class _HasClasses(Protocol):
    num_classes: int


def final_feature(config: _HasClasses) -> str:
    """The model's output: the logits of a classifier, the pooled features of a headless encoder."""
    return "logits" if config.num_classes > 0 else "pooled"
