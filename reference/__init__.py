"""ConvNeXt V2 implemented once per framework on one canonical weight schema.

Importing this package imports no deep-learning framework; ``build`` imports only the one asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from convnextv2.reference.errors import BadInputError, MissingDependencyError
from convnextv2.reference.variants import VARIANTS, ModelConfig, config_for, parse_variant


class WeightsLike(Protocol):
    """What ``build`` needs of a checkpoint (``converters.checkpoint.Checkpoint`` is one): a config,
    canonical tensors, and a check that they match."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def tensors(self) -> Mapping[str, Any]: ...

    def validate(self, where: str = ...) -> None: ...

FRAMEWORKS = ("torch", "tensorflow", "flax")

# framework -> (module holding build_<framework>, pip extra that installs it)
_BUILDERS = {
    "torch": ("convnextv2.reference.torch_model", "build_torch", "torch"),
    "tensorflow": ("convnextv2.reference.keras_model", "build_keras", "tf"),
    "flax": ("convnextv2.reference.flax_model", "build_flax", "flax"),
}


def build(ckpt: WeightsLike, framework: str = "torch", dtype: str = "float32", **options: Any) -> Any:
    """The native model for ``framework`` with the checkpoint's weights, in inference mode."""
    if framework not in _BUILDERS:
        raise BadInputError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")
    if dtype not in ("float32", "float64"):
        raise BadInputError(f"dtype must be float32 or float64, got {dtype!r}")
    module_name, function_name, extra = _BUILDERS[framework]
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("convnextv2"):
            raise
        raise MissingDependencyError(
            f"building a {framework} model needs {exc.name}; install it with: pip install 'convnextv2-toolkit[{extra}]'"
        ) from exc
    ckpt.validate()
    return getattr(module, function_name)(ckpt.config, ckpt.tensors, dtype=dtype, **options)


def run_features(model: Any, framework: str, images_nchw: Any) -> dict[str, Any]:
    """Run a model made by ``build`` on numpy NCHW images; numpy features out, the same on every framework:
    ``stem``, ``stage1``..``stage4`` (NCHW), ``pooled`` (B, C3) and ``logits`` (B, K) when there is a head."""
    if framework not in _BUILDERS:
        raise BadInputError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")
    import importlib

    return importlib.import_module(_BUILDERS[framework][0]).run_features(model, images_nchw)


__all__ = ["FRAMEWORKS", "VARIANTS", "ModelConfig", "WeightsLike", "build", "config_for", "parse_variant",
           "run_features"]
