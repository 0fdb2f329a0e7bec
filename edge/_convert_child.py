"""The conversion itself, run in a child process so a converter crash (segfault) becomes a clear error.

Started by :class:`fedge.edge.convert.ConversionWorker` as
``python -c 'from fedge.edge._convert_child import main; main()' [torch|keras]``: it imports that converter
at once (while the caller is still loading its model), then converts one job per line it reads on stdin and
answers each with a line on its stdout, until stdin closes. A line is a JOB_DIR holding ``job.json`` (source
kind, quantization), ``samples.npy`` (calibration inputs, batch first) and the model (``program.pt2``, a saved
``torch.export`` program, or a Keras path named in job.json). The child writes ``model.tflite``, or
``error.json`` with a one-line message.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np


def _torch_float(module: Any, sample: Any) -> bytes:
    import litert_torch

    return bytes(litert_torch.convert(module, (sample,)).model_content())


def _torch_int8(module: Any, samples: np.ndarray) -> bytes:
    # PT2E static quantization: per-channel int8 weights, int8 activations calibrated on real samples;
    # litert-torch then emits int8 input and output tensors.
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    sample = torch.as_tensor(samples[:1])
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    prepared = prepare_pt2e(torch.export.export(module, (sample,)).module(), quantizer)
    with torch.no_grad():
        for x in samples:
            prepared(torch.as_tensor(x[None]))
    converted = convert_pt2e(prepared, fold_quantize=False)
    # The graph was traced in eval mode already; the flag only silences litert-torch's training-mode warning.
    for m in converted.modules():
        m.training = False
    return bytes(
        litert_torch.convert(converted, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).model_content()
    )


def _requantize(float_model: bytes, quantization: str) -> bytes:
    """float16 weights or dynamic-range int8 weights, applied to a float TFLite model by ai-edge-quantizer."""
    from ai_edge_quantizer import qtyping, quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    qt = quantizer.Quantizer(float_model)
    if quantization == "dynamic":
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    else:
        qt.add_weight_only_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            num_bits=16,
            algorithm_key=AlgorithmName.FLOAT_CASTING,
        )
    return bytes(qt.quantize(enable_progress_report=False).quantized_model)


def _convert_torch(job_dir: Path, quantization: str, samples: np.ndarray) -> bytes:
    import torch

    module = torch.export.load(job_dir / "program.pt2").module()
    if quantization == "int8":
        return _torch_int8(module, samples)
    data = _torch_float(module, torch.as_tensor(samples[:1]))
    return data if quantization == "none" else _requantize(data, quantization)


def _convert_keras(path: str, quantization: str, samples: np.ndarray) -> bytes:
    import tempfile

    import tensorflow as tf

    p = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        if p.is_dir():
            saved = p
        else:
            import keras

            model = keras.models.load_model(p, compile=False)
            # A fixed batch of 1: a dynamic batch makes Keras emit SHAPE/FILL/TILE ops TFLM rejects.
            spec = tf.TensorSpec((1, *samples.shape[1:]), tf.float32)
            saved = Path(tmp) / "saved"
            model.export(str(saved), format="tf_saved_model", input_signature=[spec], verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if quantization != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            converter.representative_dataset = lambda: ([x[None]] for x in samples)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        return bytes(converter.convert())


def _layer_of(job_dir: Path, message: str) -> str:
    """The torch layer whose op the error names, as "layer '1' (Erfinv, aten.erfinv)", or ''."""
    if not (job_dir / "program.pt2").is_file():
        return ""
    try:
        import torch

        program = torch.export.load(job_dir / "program.pt2")
        # litert-torch lowers the decomposed graph, so its errors may name an op of that graph only.
        for graph in (program.graph, program.run_decompositions().graph):
            for node in graph.nodes:
                if node.op != "call_function":
                    continue
                base = str(node.target).removesuffix(".default")  # e.g. aten.gelu
                if not re.search(rf"\b{re.escape(base)}\b", message):
                    continue
                stack = node.meta.get("nn_module_stack") or {}
                if not stack:
                    return f"op {base}"
                path, cls = list(stack.values())[-1]
                cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                return f"layer {path!r} ({cls_name.rsplit('.', 1)[-1]}, {base})"
    except Exception:  # noqa: BLE001 - best effort: the error itself is still reported
        return ""
    return ""


def _preload(source: str) -> None:
    """Import the converter a job of ``source`` needs, before the first job arrives."""
    if source == "torch":
        import litert_torch  # noqa: F401
        from torchao.quantization.pt2e import quantize_pt2e  # noqa: F401
    elif source == "keras":
        import tensorflow  # noqa: F401


def _record_failure(job_dir: Path, err: Exception) -> None:
    text = str(err).strip() or type(err).__name__
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
    layer = _layer_of(job_dir, text)
    (job_dir / "error.json").write_text(
        json.dumps(
            {"message": f"{type(err).__name__}: {first[:300]}", "layer": layer, "traceback": traceback.format_exc()}
        )
    )


def convert_job(job_dir: Path) -> None:
    """Convert the job in ``job_dir``: ``model.tflite`` on success, ``error.json`` if the converter raised."""
    job = json.loads((job_dir / "job.json").read_text())
    samples = np.load(job_dir / "samples.npy")
    try:
        if job["source"] == "torch":
            data = _convert_torch(job_dir, job["quantization"], samples)
        else:
            data = _convert_keras(job["path"], job["quantization"], samples)
    except Exception as err:  # noqa: BLE001 - any converter failure becomes error.json
        _record_failure(job_dir, err)
        return
    (job_dir / "model.tflite").write_bytes(data)


def main() -> None:
    # Answers go to the real stdout; the converters' own progress lines (litert-torch prints to stdout) go to
    # stderr, so they never mix with the protocol.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    _preload(sys.argv[1] if len(sys.argv) > 1 else "")
    answers.write("ready\n")
    for line in sys.stdin:
        job_dir = Path(line.strip())
        convert_job(job_dir)
        answers.write(f"done {job_dir}\n")


if __name__ == "__main__":
    main()
