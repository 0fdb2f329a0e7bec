"""Running a ``.tflite`` model on the two real runtimes: LiteRT (``ai_edge_litert``) and TensorFlow Lite Micro
(``tflite_micro``), and finding the tensor arena TFLM needs by trial allocation.

LiteRT uses its reference kernels (``OpResolverType.BUILTIN_REF``): they follow the same integer arithmetic as
TFLM's kernels, while the optimized ones can differ by many int8 steps on a few outputs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fedge.errors import RuntimeFailure

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ARENA_MARGIN", "captured_stderr", "find_arena_bytes", "quantize_input", "run_litert", "run_tflm"]

# TFLM's recording allocator can understate the arena, and optimized MCU kernels (CMSIS-NN, ESP-NN) ask for
# scratch buffers the reference kernels do not: add a quarter and round up to whole KiB.
ARENA_MARGIN = 1.25
_ARENA_STEP = 16


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Send file descriptor 2 (where TFLM's C++ logs) to a buffer; the list holds its text on exit."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def quantize_input(x: np.ndarray, dtype: np.dtype, scale: float, zero_point: int) -> np.ndarray:
    """Float samples in the dtype a model's input expects (int8 with its scale and zero point, or float)."""
    import numpy as np

    if np.issubdtype(dtype, np.integer) and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)
    return x.astype(dtype)


def run_litert(data: bytes, x: np.ndarray) -> np.ndarray:
    """Raw outputs (in the model's output dtype) for each sample of ``x``, already in the input dtype."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        interp = Interpreter(model_content=data, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
        interp.allocate_tensors()
    except (RuntimeError, ValueError) as err:
        raise RuntimeFailure(f"the LiteRT interpreter cannot load the model: {err}") from err
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    results = []
    for sample in x:
        interp.set_tensor(inp["index"], sample.reshape(inp["shape"]))
        interp.invoke()
        results.append(interp.get_tensor(out["index"]).reshape(-1).copy())
    return np.stack(results)


def _tflm(data: bytes, arena_bytes: int):  # -> tflite_micro.runtime.Interpreter
    from tflite_micro import runtime

    return runtime.Interpreter.from_bytes(data, arena_size=arena_bytes)


def _tflm_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in lines:
        if "Didn't find op" in ln or "not supported" in ln.lower() or "unsupported" in ln.lower():
            return ln
    return lines[-1] if lines else "no log"


def find_arena_bytes(data: bytes, sample: np.ndarray) -> tuple[int, int]:
    """``(smallest arena that allocates and runs, arena with margin)`` in bytes, found by bisection.

    Raises:
        RuntimeFailure: TFLM cannot run the model at any size (the message quotes TFLM's reason).
    """
    import math

    def works(size: int) -> bool:
        with captured_stderr():
            try:
                interp = _tflm(data, size)
                interp.set_input(sample, 0)
                interp.invoke()
                return True
            except RuntimeError:
                return False

    hi = max(64 * 1024, 16 * len(data))
    with captured_stderr() as log:
        try:
            interp = _tflm(data, hi)
            interp.set_input(sample, 0)
            interp.invoke()
        except RuntimeError as err:
            failure = err
        else:
            failure = None
    if failure is not None:
        raise RuntimeFailure(f"TFLite Micro cannot run the model: {_tflm_error(log[0] if log else str(failure))}")
    lo = 0  # lo fails (or is zero), hi works
    while hi - lo > _ARENA_STEP:
        mid = (lo + hi) // 2 // _ARENA_STEP * _ARENA_STEP
        if works(mid):
            hi = mid
        else:
            lo = mid
    return hi, math.ceil(hi * ARENA_MARGIN / 1024) * 1024


def run_tflm(data: bytes, x: np.ndarray, *, arena_bytes: int) -> np.ndarray:
    """Raw outputs of TFLM for each sample of ``x`` (already in the input dtype)."""
    import numpy as np

    with captured_stderr() as log:
        try:
            interp = _tflm(data, arena_bytes)
            results = []
            for sample in x:
                interp.set_input(sample[None], 0)
                interp.invoke()
                results.append(np.asarray(interp.get_output(0)).reshape(-1).copy())
        except RuntimeError as err:
            failure: RuntimeError | None = err
        else:
            failure = None
    if failure is not None:
        raise RuntimeFailure(f"TFLite Micro failed to run the model: {_tflm_error(log[0] if log else str(failure))}")
    return np.stack(results)
