"""Independent implementations as runners: timm and Hugging Face transformers (PyTorch and TensorFlow) on a
checkpoint (written through our converter for them: the peer reads what users would publish) or on a folder or
file of their format; and a TensorFlow SavedModel as written."""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.peer_imports import import_torchvision_guarded
from convnextv2.converters.runners.base import Runner, RunnerRecord
from convnextv2.reference.errors import MissingDependencyError
from convnextv2.reference.features import final_feature


def import_timm() -> ModuleType:
    import_torchvision_guarded()
    import timm

    return timm


def import_transformers(tensorflow: bool = False) -> ModuleType:
    """transformers with only the frameworks asked for (importing TF costs seconds and memory)."""
    if not tensorflow:
        os.environ.setdefault("USE_TF", "0")
        os.environ.setdefault("USE_FLAX", "0")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_torchvision_guarded()
    import transformers

    return transformers


# ------------------------------------------------------------------ timm

def timm_model(config: Any, conv_mlp: bool | None = None) -> Any:
    """timm's ConvNeXt V2 for ``config``; ``conv_mlp`` as the weights have it (None: timm's default for the size)."""
    timm = import_timm()
    layout = {} if conv_mlp is None else {"conv_mlp": conv_mlp}
    if config.variant != "custom":
        return timm.create_model(f"convnextv2_{config.variant}", pretrained=False, num_classes=config.num_classes,
                                 **layout)
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=config.depths, dims=config.dims, use_grn=True, ls_init_value=None,
                    num_classes=config.num_classes, **layout)


class TimmRunner(Runner):
    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        import torch

        ckpt = self.checkpoint
        has_head_norm = ckpt.config.head_norm
        if self.file is not None:
            from safetensors.torch import load_file

            path = self.file.path
            state = load_file(str(path / "model.safetensors" if path.is_dir() else path))
            model = timm_model(ckpt.config, conv_mlp=state["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4)
            model.load_state_dict(state, strict=True)
        else:
            from convnextv2.converters.timm import canonical_to_state_dict

            model = timm_model(ckpt.config)
            # timm builds atto..nano with 1x1-conv MLPs; ask our writer for whichever layout this model has.
            conv_mlp = isinstance(model.stages[0].blocks[0].mlp.fc1, torch.nn.Conv2d)
            state = {k: torch.from_numpy(np.array(v)) for k, v in canonical_to_state_dict(ckpt, conv_mlp).items()}
            # A headless FCMAE encoder has no final norm, which timm's head always has: leave it at init and do
            # not compare pooled features.
            missing, unexpected = model.load_state_dict(state, strict=has_head_norm)
            if unexpected or (missing and any(not k.startswith("head.norm") for k in missing)):
                raise RuntimeError(f"timm rejected the weights: missing {missing}, unexpected {unexpected}")
        model = model.eval().to(torch.float64 if precision == "float64" else torch.float32)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(next(model.parameters()).dtype)
        with torch.no_grad():
            features = {"stem": model.stem(x)}
            last, stages = model.forward_intermediates(x, indices=4)
            features.update({f"stage{i + 1}": stage for i, stage in enumerate(stages)})
            if has_head_norm:
                features["pooled"] = model.forward_head(last, pre_logits=True)
                if ckpt.config.num_classes > 0:
                    features["logits"] = model.forward_head(last)
        return {name: value.numpy() for name, value in features.items()}


# ------------------------------------------------------------------ transformers

def hf_model_class(transformers: ModuleType, config: Any, tensorflow: bool = False) -> Any:
    name = "ConvNextV2ForImageClassification" if config.num_classes > 0 else "ConvNextV2Model"
    return getattr(transformers, ("TF" if tensorflow else "") + name)


def _hf_folder(path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        raise MissingDependencyError(f"{path}: no config.json beside the weights for transformers to load")
    return folder


def _write_hf(ckpt: Checkpoint, directory: Path) -> Path:
    """Our checkpoint written with our HF converter: the peer then reads what users would publish."""
    from convnextv2.converters import hf as hf_format

    target = directory / "hf"
    hf_format.write(ckpt, target)
    return target


def hf_features(model: Any, pixels: Any, ckpt: Checkpoint, to_numpy: Any, **call: Any) -> dict[str, np.ndarray]:
    # The classification model is the backbone plus ``classifier`` on its pooler output; calling the two
    # parts exposes the pooled features the classification output does not return.
    has_head = ckpt.config.num_classes > 0
    backbone = model.convnextv2 if has_head else model
    out = backbone(pixel_values=pixels, output_hidden_states=True, **call)
    # hidden_states: the embeddings (stem) then each stage's output, NCHW in both the PT and TF classes.
    hidden = [to_numpy(h) for h in out.hidden_states]
    features = {"stem": hidden[0], **{f"stage{i}": hidden[i] for i in range(1, 5)}}
    if ckpt.config.head_norm:
        features["pooled"] = to_numpy(out.pooler_output)
    if has_head:
        features["logits"] = to_numpy(model.classifier(out.pooler_output))
    return features


class TransformersRunner(Runner):
    """transformers' PyTorch classes; ``transformers-tf``: its TensorFlow classes (from the PyTorch weights)."""

    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        tensorflow = self.name == "transformers-tf"
        transformers = import_transformers(tensorflow=tensorflow)
        ckpt = self.checkpoint
        cls = hf_model_class(transformers, ckpt.config, tensorflow)
        with tempfile.TemporaryDirectory(prefix="convnextv2-parity-hf-") as tmp:
            folder = _hf_folder(self.file.path) if self.file is not None else _write_hf(ckpt, Path(tmp))
            if tensorflow:
                model = cls.from_pretrained(str(folder), from_pt=True)
            else:
                import torch

                model = cls.from_pretrained(str(folder),
                                            dtype=torch.float64 if precision == "float64" else torch.float32)
        if tensorflow:
            return hf_features(model, np.ascontiguousarray(images, dtype=np.float32), ckpt, np.asarray,
                               training=False)
        import torch

        model.eval()
        x = torch.from_numpy(np.ascontiguousarray(images)).to(model.dtype)
        with torch.no_grad():
            return hf_features(model, x, ckpt, lambda t: t.numpy())


def transformers_tf_blocker() -> str | None:
    """transformers 5 removed every TensorFlow class; read the installed version from its metadata (the same
    distribution ``import transformers`` finds first on sys.path) instead of importing it."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None  # the requires check then names the missing package
    major = version.split(".", 1)[0]
    if major.isdigit() and int(major) >= 5:
        return (f"transformers {version} has no TensorFlow classes (transformers 5 removed them; the 4.x series "
                "has them, e.g. transformers==4.57.6 as pinned in constraints.txt)")
    return None


# ------------------------------------------------------------------ a SavedModel as written

class SavedModelRunner(Runner):
    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        import tensorflow as tf

        from convnextv2.converters import savedmodel

        assert self.file is not None, "this runner opens a file"
        ckpt = self.checkpoint
        function = tf.saved_model.load(str(self.file.path)).signatures[savedmodel.SIGNATURE]
        out = function(**{savedmodel.INPUT_NAME: tf.constant(np.ascontiguousarray(images, dtype=np.float32))})
        return {final_feature(ckpt.config): np.asarray(out[savedmodel.output_name(ckpt)])}


RECORDS = (
    RunnerRecord("timm", "peer", "timm ConvNeXt (weights through our timm converter)", requires=("torch", "timm"),
                 extra="peers", worker="timm", precisions=("float32", "float64"), opens=("timm",),
                 file_label="timm"),
    RunnerRecord("transformers-pt", "peer", "Hugging Face transformers ConvNextV2, PyTorch",
                 aliases=("hf", "transformers"),
                 requires=("torch", "transformers"), extra="peers", worker="transformers-pt",
                 precisions=("float32", "float64"), opens=("hf",), file_label="transformers (PyTorch)"),
    RunnerRecord("transformers-tf", "peer", "Hugging Face transformers ConvNextV2, TensorFlow (tf-keras)",
                 aliases=("hf-tf",),
                 requires=("tensorflow", "tf_keras", "transformers"), extra="peers", worker="transformers-tf",
                 blocker=transformers_tf_blocker, isolated=True),
    RunnerRecord("tensorflow-savedmodel", "artifact", "TensorFlow SavedModel", requires=("tensorflow",),
                 extra="tf", worker="tensorflow", opens=("savedmodel",)),
)
