"""Running a ``.tflite`` model on the two real runtimes: LiteRT (``ai_edge_litert``) and TensorFlow Lite Micro
(``tflite_micro``), and finding the tensor arena TFLM needs by trial allocation.

LiteRT runs its own optimized CPU kernels without the default XNNPACK delegate
(``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``): of LiteRT's kernel sets they come closest to TFLM's integer
arithmetic. Both requantize FULLY_CONNECTED outputs with a rounding doubling high multiply and a rounding right
shift, but LiteRT rounds an exact half upward where TFLM (like CMSIS-NN) rounds it away from zero, so a negative
output that lands exactly on a half differs by one int8 step. The reference kernels (``BUILTIN_REF``) round
FULLY_CONNECTED once instead of twice, and XNNPACK requantizes in float: both differ from TFLM more often.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fedge.errors import RuntimeFailure

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ARENA_MARGIN",
    "captured_stderr",
    "find_arena_bytes",
    "locate_divergence",
    "quantize_input",
    "run_litert",
    "run_tflm",
]

# TFLM's recording allocator can understate the arena, and optimized MCU kernels (CMSIS-NN, ESP-NN) ask for
# scratch buffers the reference kernels do not: add a quarter and round up to whole KiB.
ARENA_MARGIN = 1.25
_ARENA_STEP = 16
LITERT_KERNELS = "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
"""The ``ai_edge_litert.interpreter.OpResolverType`` the verification runs."""


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
    return _litert_outputs(data, x)[0]


def _litert_outputs(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    """Every model output, each stacked over the samples of ``x`` and flattened per sample."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        interp = Interpreter(model_content=data, experimental_op_resolver_type=getattr(OpResolverType, LITERT_KERNELS))
        interp.allocate_tensors()
    except (RuntimeError, ValueError) as err:
        raise RuntimeFailure(f"the LiteRT interpreter cannot load the model: {err}") from err
    inp, outs = interp.get_input_details()[0], interp.get_output_details()
    results: list[list[np.ndarray]] = [[] for _ in outs]
    for sample in x:
        interp.set_tensor(inp["index"], sample.reshape(inp["shape"]))
        interp.invoke()
        for k, out in enumerate(outs):
            results[k].append(interp.get_tensor(out["index"]).reshape(-1).copy())
    return [np.stack(r) for r in results]


def _tflm(data: bytes, arena_bytes: int):  # -> tflite_micro.runtime.Interpreter
    from tflite_micro import runtime

    return runtime.Interpreter.from_bytes(data, arena_size=arena_bytes)


def _tflm_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in lines:
        if "Didn't find op" in ln or "not supported" in ln.lower() or "unsupported" in ln.lower():
            return ln
    return lines[-1] if lines else "no log"


def _run_once(data: bytes, arena_bytes: int, sample: np.ndarray) -> None:
    interp = _tflm(data, arena_bytes)
    interp.set_input(sample, 0)
    interp.invoke()


def _probe(data: bytes, arena_bytes: int, sample: np.ndarray) -> tuple[bool, str]:
    """Whether TFLM allocates and runs the model in ``arena_bytes``, and its log; in a forked child.

    TFLM can crash (SIGSEGV) instead of failing cleanly when the arena is too small for some models (an
    all-FULLY_CONNECTED int8 MLP does at 2.5 KB and below 256 B): a crashed probe is a size that does not work.
    """
    if not hasattr(os, "fork"):  # no fork (Windows): probe in this process
        with captured_stderr() as log:
            try:
                _run_once(data, arena_bytes, sample)
                ok = True
            except RuntimeError:
                ok = False
        return ok, log[0]
    from tflite_micro import runtime  # noqa: F401 - imported before the fork, not in every child

    with tempfile.TemporaryFile(mode="w+b") as log_file:
        pid = os.fork()
        if pid == 0:  # child: run once, report by exit code, never return into the caller's stack
            code = 1  # any failure means "does not run at this size"
            try:
                faulthandler.disable()  # a crash here is an answer, not news for the caller's stderr
                os.dup2(log_file.fileno(), 2)
                _run_once(data, arena_bytes, sample)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        log_file.seek(0)
        log = log_file.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        log += f"\nTFLite Micro crashed (signal {-code}) with a {arena_bytes}-byte arena"
    return code == 0, log


def find_arena_bytes(data: bytes, sample: np.ndarray) -> tuple[int, int]:
    """``(smallest arena that allocates and runs, arena with margin)`` in bytes, found by bisection.

    Raises:
        RuntimeFailure: TFLM cannot run the model at any size (the message quotes TFLM's reason).
    """
    import math

    hi = max(64 * 1024, 16 * len(data))
    ok, log = _probe(data, hi, sample)
    if not ok:
        raise RuntimeFailure(f"TFLite Micro cannot run the model: {_tflm_error(log)}")
    lo = 0  # lo fails (or is zero), hi works
    while hi - lo > _ARENA_STEP:
        mid = (lo + hi) // 2 // _ARENA_STEP * _ARENA_STEP
        if _probe(data, mid, sample)[0]:
            hi = mid
        else:
            lo = mid
    return hi, math.ceil(hi * ARENA_MARGIN / 1024) * 1024


def run_tflm(data: bytes, x: np.ndarray, *, arena_bytes: int) -> np.ndarray:
    """Raw outputs of TFLM for each sample of ``x`` (already in the input dtype)."""
    return _tflm_outputs(data, x, arena_bytes=arena_bytes)[0]


def _tflm_outputs(data: bytes, x: np.ndarray, *, arena_bytes: int) -> list[np.ndarray]:
    import numpy as np

    with captured_stderr() as log:
        try:
            interp = _tflm(data, arena_bytes)
            n_out = _output_count(data)
            results: list[list[np.ndarray]] = [[] for _ in range(n_out)]
            for sample in x:
                interp.set_input(sample[None], 0)
                interp.invoke()
                for k in range(n_out):
                    results[k].append(np.asarray(interp.get_output(k)).reshape(-1).copy())
        except RuntimeError as err:
            failure: RuntimeError | None = err
        else:
            failure = None
    if failure is not None:
        raise RuntimeFailure(f"TFLite Micro failed to run the model: {_tflm_error(log[0] if log else str(failure))}")
    return [np.stack(r) for r in results]


def _output_count(data: bytes) -> int:
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb

    return int(fb.Model.GetRootAsModel(data, 0).Subgraphs(0).OutputsLength())


def with_every_op_output(data: bytes) -> tuple[bytes, list[tuple[int, str, str]]]:
    """A copy of the model whose outputs are every operator's outputs, in execution order, and for each output
    ``(op index, op name, tensor name)``."""
    import flatbuffers
    import numpy as np
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb

    from fedge.edge.tflite_info import operator_names

    parsed = fb.Model.GetRootAsModel(data, 0)
    model = fb.ModelT.InitFromObj(parsed)
    graph = model.subgraphs[0]
    produced: list[tuple[int, str, str]] = []
    tensors: list[int] = []
    for i, (op, name) in enumerate(zip(graph.operators, operator_names(parsed), strict=True)):
        for t in op.outputs:
            if t >= 0:
                tensors.append(int(t))
                produced.append((i, name, (graph.tensors[t].name or b"").decode(errors="replace")))
    graph.outputs = np.array(tensors, dtype=np.int32)
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), produced


def first_difference(
    produced: list[tuple[int, str, str]], first: list[np.ndarray], second: list[np.ndarray]
) -> dict[str, object] | None:
    """The first op whose outputs (``first[k]`` vs ``second[k]``, samples x values) differ, or ``None``."""
    import numpy as np

    for (op_index, op, tensor), a, b in zip(produced, first, second, strict=True):
        differs = (a != b).reshape(len(a), -1).any(axis=1)
        if differs.any():
            return {
                "op_index": op_index,
                "op": op,
                "tensor": tensor,
                "samples": int(differs.sum()),
                "max_abs_diff": float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()),
            }
    return None


def locate_divergence(data: bytes, x: np.ndarray) -> dict[str, object] | None:
    """The first operator (in execution order) whose output differs between LiteRT and TFLM on ``x``.

    Runs a copy of the model in which every operator's output is a model output, so a one-step difference in
    the final output is traced to the op that rounds differently. ``None`` when every op agrees.
    """
    probe, produced = with_every_op_output(data)
    litert = _litert_outputs(probe, x)
    # Every intermediate tensor is now an output that TFLM keeps for the whole run: a generous arena.
    tflm = _tflm_outputs(probe, x, arena_bytes=max(256 * 1024, 32 * len(probe)))
    return first_difference(produced, litert, tflm)
