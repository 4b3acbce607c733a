"""Our own models as runners: the PyTorch, Keras 3 / TensorFlow and Flax NNX references (reference/), on a
checkpoint or on a file of their own format (canonical, original, Keras, Flax: read into the checkpoint given)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from convnextv2.converters.runners.base import RunContext, Runner, RunnerRecord
from convnextv2.reference import parity_rule

# The framework each reference imports first (timed apart from building the model).
FRAMEWORK_MODULES = {"torch": "torch", "tensorflow": "tensorflow", "flax": "flax.nnx"}

# XLA executables kept beside the parity cache's entries (JAX keys each by its program, the jaxlib version and the
# backend's flags: a changed model, toolkit or jaxlib compiles afresh). Bounded apart from the entries' LRU.
JAX_COMPILATIONS = "jax-compilations"
JAX_COMPILATIONS_MAX_BYTES = 512 * 2**20


class ReferenceRunner(Runner):
    @property
    def framework(self) -> str:
        return {"torch": "torch", "tensorflow": "tensorflow", "flax": "flax"}[self.name]

    def infer(self, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
        from convnextv2 import reference

        framework, ckpt = self.framework, self.checkpoint
        with self.context.phase("import"):
            importlib.import_module(FRAMEWORK_MODULES[framework])
        if framework == "flax":
            keep_jax_compilations(self.context)
        if framework == "torch" and precision in parity_rule.REDUCED_PRECISIONS:
            # The recipe every deployment runtime is measured against (norms in float32): at reduced precision
            # the PyTorch reference is its own baseline, as it is at float32.
            with self.context.phase("forward"):
                return parity_rule.baseline_features(ckpt, images, precision)
        with self.context.phase("build"):
            model = reference.build(ckpt, framework, dtype=precision)
        with self.context.phase("forward"):
            return reference.run_features(model, framework, images.astype(precision))


def keep_jax_compilations(context: RunContext) -> None:
    """Point JAX's persistent compilation cache into a persistent parity cache: the Flax forward (5 s of XLA
    compilation at tiny on two cores) then compiles once per model and input shape, not once per run. The
    executable is the one the compiler made the first time, so the run computes exactly what it did. Set once
    per process, before JAX compiles anything; a run without a persistent cache leaves JAX alone."""
    import jax

    cache = context.cache
    if not (cache.persistent and cache.enabled) or cache.root is None:
        return
    folder = Path(cache.root) / JAX_COMPILATIONS
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


RECORDS = (
    RunnerRecord("torch", "runtime", "PyTorch reference (reference/torch_model.py)", aliases=("pytorch",),
                 requires=("torch",), extra="torch", worker="torch",
                 precisions=("float32", "float64", "bfloat16", "float16"), opens=("canonical", "original"),
                 file_label="PyTorch reference"),
    RunnerRecord("tensorflow", "runtime", "Keras 3 / TensorFlow reference (reference/keras_model.py)",
                 aliases=("tf", "keras"), requires=("tensorflow", "keras"), extra="tf", worker="tensorflow",
                 precisions=("float32", "float64"), opens=("keras",),
                 file_label="Keras reference (reference/keras_model.py)"),
    RunnerRecord("flax", "runtime", "Flax NNX reference (reference/flax_model.py)", aliases=("jax",),
                 requires=("jax", "flax"), extra="flax", worker="flax", precisions=("float32", "float64"),
                 opens=("flax",), file_label="Flax reference (reference/flax_model.py)"),
)
