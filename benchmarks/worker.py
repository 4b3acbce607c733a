"""One benchmark worker process per framework group, driven over stdin/stdout with JSON lines.

Each framework runs in its own process so thread pools and allocators do not interfere; the coordinator
interleaves timing rounds across workers. Commands: ``load`` (build a runtime for a variant, warm it up),
``time`` (run it ``iters`` times on a fixed batch, return the durations), ``unload``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import numpy as np

GROUPS = {
    "torch": ("torch", "torch-plain", "timm", "transformers"),
    "tensorflow": ("tensorflow",),
    "flax": ("flax",),
    "onnxruntime": ("onnxruntime", "onnxruntime-timm"),
}


def _images(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(batch * 1000 + size).standard_normal((batch, 3, size, size), dtype=np.float32)


class Runtimes:
    def __init__(self, threads: int):
        self.threads = threads
        self.forward: dict[str, Any] = {}

    # ------------------------------------------------------------------ builders: each returns f(images_nchw)

    def _torch_common(self) -> Any:
        import torch

        torch.set_num_threads(self.threads)
        return torch

    def build_torch(self, spec: dict[str, Any]) -> Any:
        torch = self._torch_common()
        from convnextv2 import converters, reference

        model = reference.build(converters.load(spec["canonical"]), "torch")

        def run(images: np.ndarray) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(images))

        return run

    def build_torch_plain(self, spec: dict[str, Any]) -> Any:
        """Our PyTorch reference with the float32 fast path off: the plain formulation, as before the speed work."""
        from convnextv2.reference import torch_model

        torch_model.FAST_FLOAT32 = False
        try:
            plain = self.build_torch(spec)
        finally:
            torch_model.FAST_FLOAT32 = True

        def run(images: np.ndarray) -> Any:
            torch_model.FAST_FLOAT32 = False
            try:
                return plain(images)
            finally:
                torch_model.FAST_FLOAT32 = True

        return run

    def build_timm(self, spec: dict[str, Any]) -> Any:
        torch = self._torch_common()
        from convnextv2.converters.runners.peers import import_timm
        from convnextv2.converters.torchzip import read_torch_zip

        timm = import_timm()
        from timm.models.convnext import checkpoint_filter_fn

        model = timm.create_model(f"convnextv2_{spec['variant']}", pretrained=False).eval()
        state = {k: torch.from_numpy(np.array(v)) for k, v in read_torch_zip(spec["original"])["model"].items()}
        model.load_state_dict(checkpoint_filter_fn(state, model))

        def run(images: np.ndarray) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(images))

        return run

    def build_transformers(self, spec: dict[str, Any]) -> Any:
        torch = self._torch_common()
        from convnextv2.converters.runners.peers import import_transformers

        transformers = import_transformers()
        if spec.get("hf_dir"):
            model = transformers.ConvNextV2ForImageClassification.from_pretrained(spec["hf_dir"]).eval()
        else:  # no HF converter in this install: same architecture, random weights (timing only)
            config = transformers.ConvNextV2Config(depths=spec["depths"], hidden_sizes=spec["dims"],
                                                   layer_norm_eps=1e-6)
            model = transformers.ConvNextV2ForImageClassification(config).eval()

        def run(images: np.ndarray) -> Any:
            with torch.inference_mode():
                return model(pixel_values=torch.from_numpy(images)).logits

        return run

    def build_tensorflow(self, spec: dict[str, Any]) -> Any:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(self.threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # already initialised by an earlier load in this worker
        from convnextv2 import converters, reference
        from convnextv2.reference import keras_model

        model = reference.build(converters.load(spec["canonical"]), "tensorflow")
        spec_in = tf.TensorSpec((None, None, None, 3), tf.float32)

        @tf.function(input_signature=[spec_in], jit_compile=keras_model.JIT_COMPILE, reduce_retracing=True)
        def forward(images_nhwc: Any) -> Any:
            return model(images_nhwc, training=False)

        def run(images: np.ndarray) -> Any:
            return forward(images).numpy()

        return run, "nhwc"

    def build_flax(self, spec: dict[str, Any]) -> Any:
        import jax
        from flax import nnx

        from convnextv2 import converters, reference

        model = reference.build(converters.load(spec["canonical"]), "flax")
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))

        def run(images: np.ndarray) -> Any:
            return forward(state, images).block_until_ready()

        return run, "nhwc"

    def _ort(self, path: str) -> Any:
        from convnextv2.converters.onnx.session import ort_session

        session = ort_session(path, threads=self.threads)
        name = session.get_inputs()[0].name

        def run(images: np.ndarray) -> Any:
            return session.run(None, {name: images})

        return run

    def build_onnxruntime(self, spec: dict[str, Any]) -> Any:
        return self._ort(spec["onnx_ours"])

    def build_onnxruntime_timm(self, spec: dict[str, Any]) -> Any:
        return self._ort(spec["onnx_timm"])

    # ------------------------------------------------------------------ protocol

    def load(self, runtime: str, spec: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        built = getattr(self, "build_" + runtime.replace("-", "_"))(spec)
        run, layout = built if isinstance(built, tuple) else (built, "nchw")
        self.forward[runtime] = (run, layout)
        return {"load_s": time.perf_counter() - start}

    def time(self, runtime: str, batch: int, size: int, iters: int, warmup: int) -> dict[str, Any]:
        run, layout = self.forward[runtime]
        images = _images(batch, size)
        if layout == "nhwc":
            images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        for _ in range(warmup):
            run(images)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            run(images)
            times.append(time.perf_counter() - start)
        return {"times": times}


def main() -> None:
    # Replies go over a private copy of stdout; anything a framework prints lands on stderr instead.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    runtimes = Runtimes(int(os.environ.get("BENCH_THREADS", "2")))
    for line in sys.stdin:
        request = json.loads(line)
        try:
            op = request.pop("op")
            if op == "load":
                reply = runtimes.load(request["runtime"], request["spec"])
            elif op == "time":
                reply = runtimes.time(**request)
            elif op == "unload":
                runtimes.forward.clear()
                import gc

                gc.collect()
                reply = {}
            else:
                raise ValueError(f"unknown op {op!r}")
            reply["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator as a "not available" row
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                     "trace": traceback.format_exc()[-1500:]}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
