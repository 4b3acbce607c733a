"""Runtime registry of the parity harness: one small adapter per runtime, all producing the same feature dict.

An adapter takes a canonical :class:`Checkpoint`, NCHW numpy images and a dtype, and returns numpy
``stem``, ``stage1``..``stage4`` (NCHW), ``pooled`` (B, C3) and ``logits`` (B, K). A peer that does not expose
a feature leaves it out; the harness reports it as "not exposed" instead of comparing it.

``availability()`` is cheap (no framework import) and says why a runtime cannot run here; a runtime whose
module lands later is picked up without changing this file's callers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.parity_tests.cache import current_cache, phase

FeatureFn = Callable[[Checkpoint, np.ndarray, str], dict[str, np.ndarray]]


@dataclasses.dataclass
class Runtime:
    name: str
    kind: str  # "runtime" (our implementations), "peer" (independent libraries) or "custom"
    description: str
    features: FeatureFn
    # Python modules that must be importable (found, not imported) and the pip extra that provides them.
    requires: tuple[str, ...] = ()
    extra: str = ""
    dtypes: tuple[str, ...] = ("float32",)
    # A reason installing ``requires`` would not fix (an installed library version without the classes the
    # runtime needs); asked first, so the user is told the decisive reason. Must stay cheap: no framework import.
    blocker: Callable[[], str | None] | None = None

    def availability(self) -> str | None:
        """None when the runtime can run here, else the reason it cannot."""
        if self.blocker is not None:
            reason = self.blocker()
            if reason is not None:
                return reason
        for module in self.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                hint = f"; install it with: pip install 'convnextv2-toolkit[{self.extra}]'" if self.extra else ""
                return f"{module} is not installed{hint}"
        return None


RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    RUNTIMES[runtime.name] = runtime
    return runtime


def get(name: str) -> Runtime:
    from convnextv2.reference.errors import BadInputError

    if name not in RUNTIMES:
        raise BadInputError(f"unknown runtime {name!r}; expected one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def runtime_names(kind: str) -> list[str]:
    return [name for name, runtime in RUNTIMES.items() if runtime.kind == kind]


_CHILD_FLAG = "CONVNEXTV2_PARITY_CHILD"


def _in_child_process(name: str, ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Run runtime ``name`` in a fresh interpreter: the checkpoint and images handed over as the parity workers
    get them (a canonical file, bit-exact, and a .npy), the features back as a .npz."""
    from convnextv2.parity_tests.workers import hand_off

    with hand_off(ckpt, images) as work:
        env = {k: v for k, v in os.environ.items() if k not in ("USE_TF", "USE_TORCH")}
        env[_CHILD_FLAG] = "1"
        code = "import sys; from convnextv2.parity_tests.runtimes import child_main; child_main(sys.argv[1:])"
        done = subprocess.run([sys.executable, "-c", code, name, str(work), dtype], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{name} failed in its own process: {tail}")
        with np.load(work / "features.npz") as data:
            return {key: data[key] for key in data.files}


def child_main(argv: list[str]) -> None:
    from convnextv2 import converters

    name, work, dtype = argv[0], Path(argv[1]), argv[2]
    ckpt = converters.load(work / "model.safetensors", format="canonical")
    features = RUNTIMES[name].features(ckpt, np.load(work / "images.npy"), dtype)
    np.savez(work / "features.npz", **features)  # type: ignore[arg-type]


# ------------------------------------------------------------------ our runtimes

# The framework each reference imports first (timed apart from building the model).
_FRAMEWORK_MODULES = {"torch": "torch", "tensorflow": "tensorflow", "flax": "flax.nnx"}


def _reference_features(framework: str) -> FeatureFn:
    def run(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        from convnextv2 import reference
        from convnextv2.reference import parity_rule

        with phase("import"):
            importlib.import_module(_FRAMEWORK_MODULES[framework])
        if framework == "flax":
            _keep_jax_compilations()
        if framework == "torch" and dtype in parity_rule.REDUCED_PRECISIONS:
            # The recipe every deployment runtime is measured against (norms in float32): at reduced precision
            # the PyTorch reference is its own baseline, as it is at float32.
            with phase("forward"):
                return parity_rule.baseline_features(ckpt, images, dtype)
        with phase("build"):
            model = reference.build(ckpt, framework, dtype=dtype)
        with phase("forward"):
            return reference.run_features(model, framework, images.astype(dtype))
    return run


# XLA executables kept beside the parity cache's entries (JAX keys each by its program, the jaxlib version and the
# backend's flags: a changed model, toolkit or jaxlib compiles afresh). Bounded apart from the entries' LRU.
JAX_COMPILATIONS = "jax-compilations"
JAX_COMPILATIONS_MAX_BYTES = 512 * 2**20


def _keep_jax_compilations() -> None:
    """Point JAX's persistent compilation cache into a persistent parity cache: the Flax forward (5 s of XLA
    compilation at tiny on two cores) then compiles once per model and input shape, not once per run. The
    executable is the one the compiler made the first time, so the run computes exactly what it did. Set once
    per process, before JAX compiles anything; a run without a persistent cache leaves JAX alone."""
    import jax

    with current_cache() as cache:
        if not (cache.persistent and cache.enabled) or cache.root is None:
            return
        folder = cache.root / JAX_COMPILATIONS
    if jax.config.jax_compilation_cache_dir:
        return  # the user's own setting, or this process's first run: either way, kept
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # an unwritable cache has been reported by the cache itself; compiling is only slower
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", JAX_COMPILATIONS_MAX_BYTES)


@contextlib.contextmanager
def _onnx_graph(ckpt: Checkpoint, size: int, fp16: bool) -> Iterator[Path]:
    """The torch export with every stage as an output (model.onnx in the folder yielded), through the parity
    cache: onnxruntime and OpenVINO read the same graph, so one run exports it once."""
    from convnextv2.converters.onnx import export as onnx_export

    with current_cache() as cache:
        parts = {"checkpoint": cache.digest(ckpt), "size": size, "features": True, "fp16": fp16, "via": "torch",
                 "opset": onnx_export.DEFAULT_OPSET["torch"]}
        with cache.folder("onnx", parts, lambda folder: onnx_export.write_unchecked(
                ckpt, folder / "model.onnx", size=size, features=True, fp16=fp16)) as folder:
            yield folder / "model.onnx"


def _onnx_features(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """The torch ONNX export of the checkpoint with every stage as an output, run by onnxruntime at the full
    optimisation level (where onnxruntime's BiasGelu fusion has broken ConvNeXt V2 exports before,
    facebookresearch/ConvNeXt-V2 issue #68)."""
    with phase("import"):
        import onnxruntime  # noqa: F401

        from convnextv2.converters.onnx import session as onnx_session
    with contextlib.ExitStack() as stack:
        with phase("export"):
            path = stack.enter_context(_onnx_graph(ckpt, int(images.shape[-1]), dtype == "float16"))
        with phase("compile"):
            session = onnx_session.ort_session(path, threads=2)
        with phase("forward"):
            outputs = onnx_session.run_ort(session, images)
    return _onnx_outputs_to_features(outputs)


def _onnx_outputs_to_features(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from convnextv2.parity_tests.harness import FEATURES

    return {name: outputs[name] for name in FEATURES if name in outputs}


register(Runtime("torch", "runtime", "PyTorch reference (reference/torch_model.py)", _reference_features("torch"),
                 requires=("torch",), extra="torch", dtypes=("float32", "float64", "bfloat16", "float16")))
register(Runtime("tensorflow", "runtime", "Keras 3 / TensorFlow reference (reference/keras_model.py)",
                 _reference_features("tensorflow"), requires=("tensorflow", "keras"), extra="tf",
                 dtypes=("float32", "float64")))
register(Runtime("flax", "runtime", "Flax NNX reference (reference/flax_model.py)", _reference_features("flax"),
                 requires=("jax", "flax"), extra="flax", dtypes=("float32", "float64")))
register(Runtime("onnxruntime", "runtime", "onnxruntime on the ONNX export (converters/onnx/export.py)",
                 _onnx_features, requires=("torch", "onnx", "onnxruntime", "onnxscript"), extra="onnx",
                 dtypes=("float32", "float16")))


def _executorch_features(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """A .pte of the checkpoint (XNNPACK delegate, every stage as an output) run by the ExecuTorch runtime, as
    a user loads it: from the file."""
    with phase("import"):
        # The runtime only: the exporter (executorch.exir) is imported by the export, when the program is built.
        import torch  # noqa: F401

        from convnextv2.converters import executorch
        from convnextv2.converters.onnx.interface import output_names
    size = int(images.shape[-1])

    def build(folder: Path) -> None:
        (folder / "model.pte").write_bytes(executorch.program_bytes(ckpt, size, features=True))

    with contextlib.ExitStack() as stack:
        with phase("export"):
            cache = stack.enter_context(current_cache())
            folder = stack.enter_context(cache.folder(
                "executorch", {"checkpoint": cache.digest(ckpt), "size": size, "features": True}, build))
        with phase("forward"):
            return executorch.run_program(folder / "model.pte", images, output_names(ckpt, features=True))


register(Runtime("executorch", "runtime", "ExecuTorch (XNNPACK delegate) on the .pte export (converters/executorch.py)",
                 _executorch_features, requires=("torch", "executorch"), extra="executorch"))


# A runtime may say how it actually ran (the precision its library reports, which interpreter) under this key,
# as a 0-d string array beside its features; the harness shows it as the row's note.
DETAIL_KEY = "detail"


def _detail(text: str) -> np.ndarray:
    return np.asarray(text)


def _openvino_features(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """An OpenVINO IR of the checkpoint (converted from the torch ONNX export, every stage as an output),
    compiled on the CPU with INFERENCE_PRECISION_HINT pinned to ``dtype`` and read back: a plugin that settles
    on another precision makes the runtime unavailable at ``dtype`` rather than judged at the wrong one. At
    float32 the plugin's default compile runs too, so the report shows what a user who passes no hint gets.
    One IR serves every precision (the hint is a compile option)."""
    with phase("import"):
        import openvino

        from convnextv2.converters import openvino as ov_export
    from convnextv2.reference import parity_rule
    from convnextv2.reference.errors import PrecisionUnavailableError

    size = int(images.shape[-1])

    def build(folder: Path) -> None:
        with _onnx_graph(ckpt, size, False) as onnx_path:
            ov_export.write_unchecked(ckpt, onnx_path, folder / "model.xml", features=True, size=size)

    with contextlib.ExitStack() as stack:
        with phase("export"):
            cache = stack.enter_context(current_cache())
            folder = stack.enter_context(cache.folder(
                "openvino", {"checkpoint": cache.digest(ckpt), "size": size, "features": True}, build))
        path = folder / "model.xml"
        with phase("compile"):
            compiled, precision = ov_export.compile_ir(path, dtype)
        if precision != dtype:
            raise PrecisionUnavailableError(f"OpenVINO's CPU plugin here runs {precision} when asked for {dtype} "
                                         f"(INFERENCE_PRECISION_HINT={ov_export.PRECISION_HINTS[dtype]})")
        with phase("forward"):
            features = ov_export.run(compiled, images)
        del compiled
        note = (f"OpenVINO {openvino.get_version().split('-')[0]} CPU, INFERENCE_PRECISION_HINT="
                f"{ov_export.PRECISION_HINTS[dtype]}: ran at {precision} (read back)")
        if dtype == "float32":
            with phase("default compile"):
                default, default_precision = ov_export.compile_ir(path, None)
                final = "logits" if "logits" in features else "pooled"
                moved = parity_rule.scale_aware_error(ov_export.run(default, images)[final], features[final])
            note += (f"; without a hint it runs at {default_precision} here, {final} off the pinned run by "
                     f"{moved:.2e} scale-aware")
    return {**_onnx_outputs_to_features(features), DETAIL_KEY: _detail(note)}


def _litert_features(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """A .tflite of the checkpoint (builtin ops, every stage as an output) run by the LiteRT interpreter, as a
    user loads it: from the file. float16: float16 weights, which LiteRT's CPU kernels dequantize."""
    with phase("import"):
        # The interpreter only: TensorFlow (the converter) is imported by the export, when the file is built.
        from convnextv2.converters import litert

    fp16 = dtype == "float16"
    size = int(images.shape[-1])
    with contextlib.ExitStack() as stack:
        with phase("export"):
            cache = stack.enter_context(current_cache())
            parts = {"checkpoint": cache.digest(ckpt), "size": size, "features": True, "fp16": fp16}
            folder = stack.enter_context(cache.folder("litert", parts, lambda folder: litert.write_unchecked(
                ckpt, folder / "model.tflite", size=size, features=True, fp16=fp16)))
        with phase("compile"):
            interpreter = litert.interpreter(folder / "model.tflite")
        with phase("forward"):
            features = litert.run(interpreter, images)
    note = f"{litert.interpreter_name()} interpreter, " + (
        "float16 weights dequantized to float32 at load" if fp16 else "float32")
    return {**_onnx_outputs_to_features(features), DETAIL_KEY: _detail(note)}


register(Runtime("openvino", "runtime", "OpenVINO CPU on the IR export, precision hint pinned "
                 "(converters/openvino.py)", _openvino_features,
                 requires=("openvino", "torch", "onnx", "onnxscript"), extra="openvino",
                 dtypes=("float32", "bfloat16", "float16")))
register(Runtime("litert", "runtime", "LiteRT interpreter on the .tflite export (converters/litert.py)",
                 _litert_features, requires=("tensorflow", "ai_edge_litert"), extra="litert",
                 dtypes=("float32", "float16")))


# ------------------------------------------------------------------ peers (independent implementations)

def _timm_model(ckpt: Checkpoint) -> Any:
    from convnextv2.parity_tests.peers import import_timm

    timm = import_timm()
    config = ckpt.config
    if config.variant != "custom":
        return timm.create_model(f"convnextv2_{config.variant}", pretrained=False, num_classes=config.num_classes)
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=config.depths, dims=config.dims, use_grn=True, ls_init_value=None,
                    num_classes=config.num_classes)


def _timm_state_dict(ckpt: Checkpoint, model: Any) -> dict[str, Any]:
    import torch

    from convnextv2.converters.timm import canonical_to_state_dict

    # timm builds atto..nano with 1x1-conv MLPs; ask our writer for whichever layout this model has.
    conv_mlp = isinstance(model.stages[0].blocks[0].mlp.fc1, torch.nn.Conv2d)
    return {k: torch.from_numpy(np.array(v)) for k, v in canonical_to_state_dict(ckpt, conv_mlp).items()}


def _timm_features(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    import torch

    model = _timm_model(ckpt)
    state = _timm_state_dict(ckpt, model)
    # A headless FCMAE encoder has no final norm, which timm's head always has: leave it at init and do
    # not compare pooled features.
    has_head_norm = ckpt.config.head_norm
    missing, unexpected = model.load_state_dict(state, strict=has_head_norm)
    if unexpected or (missing and any(not k.startswith("head.norm") for k in missing)):
        raise RuntimeError(f"timm rejected the weights: missing {missing}, unexpected {unexpected}")
    model = model.eval().to(torch.float64 if dtype == "float64" else torch.float32)
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


def _hf_directory(ckpt: Checkpoint, directory: Path) -> Path:
    """Our checkpoint written with our HF converter: the peer then reads what users would publish."""
    from convnextv2 import converters

    target = directory / "hf"
    converters.save(ckpt, target, format="hf")
    return target


def _hf_pt_features(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    import torch

    from convnextv2.parity_tests.peers import import_transformers

    transformers = import_transformers()
    with tempfile.TemporaryDirectory(prefix="convnextv2-parity-hf-") as tmp:
        target = _hf_directory(ckpt, Path(tmp))
        cls = (transformers.ConvNextV2ForImageClassification if ckpt.config.num_classes > 0
               else transformers.ConvNextV2Model)
        model = cls.from_pretrained(str(target), dtype=torch.float64 if dtype == "float64" else torch.float32)
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(images)).to(model.dtype)
    with torch.no_grad():
        return _hf_outputs(model, x, ckpt, lambda t: t.numpy())


def _hf_outputs(model: Any, pixels: Any, ckpt: Checkpoint, to_numpy: Callable[[Any], np.ndarray],
                **call: Any) -> dict[str, np.ndarray]:
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


def _hf_tf_features(ckpt: Checkpoint, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    # transformers decides once per process whether TensorFlow is enabled, and the PyTorch peer turns it
    # off (importing TF costs seconds and memory): the TF peer runs in a process of its own.
    if os.environ.get(_CHILD_FLAG) != "1":
        return _in_child_process("transformers-tf", ckpt, images, dtype)
    from convnextv2.parity_tests.peers import import_transformers

    transformers = import_transformers(tensorflow=True)
    with tempfile.TemporaryDirectory(prefix="convnextv2-parity-hftf-") as tmp:
        target = _hf_directory(ckpt, Path(tmp))
        cls = (transformers.TFConvNextV2ForImageClassification if ckpt.config.num_classes > 0
               else transformers.TFConvNextV2Model)
        model = cls.from_pretrained(str(target), from_pt=True)
    return _hf_outputs(model, np.ascontiguousarray(images, dtype=np.float32), ckpt, lambda t: np.asarray(t),
                       training=False)


def _transformers_tf_blocker() -> str | None:
    """transformers 5 removed every TensorFlow class; read the installed version from its metadata (the same
    distribution ``import transformers`` finds first on sys.path) instead of importing it."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None  # the requires check then names the missing package
    major = version.split(".", 1)[0]
    if major.isdigit() and int(major) >= 5:
        return (f"transformers {version} has no TensorFlow classes (transformers 5 removed them; the 4.x series "
                "has them, e.g. transformers==4.57.6 as pinned in constraints.txt)")
    return None


register(Runtime("timm", "peer", "timm ConvNeXt (weights through our timm converter)",
                 _timm_features, requires=("torch", "timm"), extra="peers", dtypes=("float32", "float64")))
register(Runtime("transformers-pt", "peer", "Hugging Face transformers ConvNextV2, PyTorch",
                 _hf_pt_features, requires=("torch", "transformers"), extra="peers", dtypes=("float32", "float64")))
register(Runtime("transformers-tf", "peer", "Hugging Face transformers ConvNextV2, TensorFlow (tf-keras)",
                 _hf_tf_features, requires=("tensorflow", "tf_keras", "transformers"), extra="peers",
                 blocker=_transformers_tf_blocker))
