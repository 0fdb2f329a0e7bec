"""``export_tflite``: a torch ``nn.Module`` or a Keras model to a verified-runnable :class:`EdgeModel`.

Torch models convert through litert-torch (int8 by PT2E static quantization, float16 and dynamic-range by
ai-edge-quantizer); Keras models through TensorFlow's TFLite converter. The conversion runs in a child
process so a converter crash becomes a clear error instead of taking the caller down.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from fedge.edge.csource import c_source
from fedge.errors import ConfigError, DataError, RuntimeFailure
from fedge.failure import read_failure
from fedge.rundir import atomic_write_bytes

if TYPE_CHECKING:
    import numpy as np

    from fedge.edge.tflite_info import ModelInfo

__all__ = ["ConversionWorker", "EdgeModel", "Quantization", "export_tflite", "load_edge_model"]

CONVERT_TIMEOUT_S = 600
_CHILD_CODE = "from fedge.edge._convert_child import main; main()"
FAILURE_FILE = "failure.json"  # = fedge.edge._convert_child.FAILURE_FILE (that module imports numpy at once)


class Quantization(StrEnum):
    """How weights and activations are stored in the exported model."""

    NONE = "none"
    """float32 throughout."""
    FLOAT16 = "float16"
    """float16 weights, float32 compute (LiteRT only; TFLM has no float16 kernels)."""
    DYNAMIC = "dynamic"
    """int8 weights, activations quantized on the fly (LiteRT only; TFLM has no hybrid kernels)."""
    INT8 = "int8"
    """Full integer: int8 weights, activations, input and output, calibrated on real samples."""

    @classmethod
    def parse(cls, value: str) -> Quantization:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown quantization {value!r}; valid: {', '.join(q.value for q in cls)}") from None

    @property
    def runs_on_tflm(self) -> bool:
        return self in (Quantization.NONE, Quantization.INT8)


@dataclass(frozen=True, slots=True)
class EdgeModel:
    """A converted ``.tflite`` model: its bytes, and calls that run it on LiteRT.

    Example::

        edge = export_tflite(model, x_train[:200], quantization="int8")
        probs = edge(x_test)            # float outputs, one row per sample (LiteRT reference kernels)
        edge.save("model.tflite")
        cc, h = edge.to_c_source("g_model")
    """

    data: bytes
    quantization: Quantization

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    def info(self) -> ModelInfo:
        """Ops, tensors and quantization parameters (see :func:`fedge.edge.inspect_tflite`)."""
        from fedge.edge.tflite_info import inspect_tflite

        return inspect_tflite(self.data)

    def quantize_inputs(self, x: np.ndarray) -> np.ndarray:
        """Float samples as the model's input tensor takes them (int8 for a full-integer model)."""
        import numpy as np

        from fedge.edge.runtimes import quantize_input

        inp = self.info().inputs[0]
        dtype = np.dtype(inp.dtype)
        scale = inp.scales[0] if inp.scales else 0.0
        zero = inp.zero_points[0] if inp.zero_points else 0
        return quantize_input(np.asarray(x, dtype=np.float32).reshape(len(x), *inp.shape[1:]), dtype, scale, zero)

    def dequantize_outputs(self, raw: np.ndarray) -> np.ndarray:
        """Raw outputs (int8 for a full-integer model) as float32."""
        import numpy as np

        out = self.info().outputs[0]
        if out.scales and np.issubdtype(raw.dtype, np.integer):
            return ((raw.astype(np.float32) - out.zero_points[0]) * out.scales[0]).astype(np.float32)
        return raw.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Float outputs for a batch of float samples, run one by one on the LiteRT interpreter."""
        from fedge.edge.runtimes import run_litert

        return self.dequantize_outputs(run_litert(self.data, self.quantize_inputs(x)))

    def save(self, path: str | Path) -> Path:
        """Write the ``.tflite`` file atomically."""
        return atomic_write_bytes(path, self.data)

    def to_c_source(self, symbol: str = "g_model") -> tuple[str, str]:
        """``(model_data.cc, model_data.h)``: a 16-byte-aligned ``const unsigned char`` array and ``SYMBOL_len``."""
        return c_source(self.data, symbol)


def load_edge_model(path: str | Path) -> EdgeModel:
    """Read a ``.tflite`` file; its quantization is inferred from its tensors.

    Raises:
        DataError: missing, unreadable or not a TFLite model.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no TFLite model at {str(path)!r}; pass an existing .tflite file")
    data = path.read_bytes()
    from fedge.edge.tflite_info import inspect_tflite

    info = inspect_tflite(data)
    dtypes = {t.dtype for t in info.tensors}
    if info.inputs and info.inputs[0].dtype == "int8":
        quant = Quantization.INT8
    elif "float16" in dtypes:
        quant = Quantization.FLOAT16
    elif "int8" in dtypes:
        quant = Quantization.DYNAMIC
    else:
        quant = Quantization.NONE
    return EdgeModel(data=data, quantization=quant)


def _child_env(num_threads: int | None) -> dict[str, str]:
    # TensorFlow's C++ start-up chatter is not news to a user; errors still come through.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if num_threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(num_threads))  # the user's own setting wins
    return env


def _is_torch_module(model: object) -> bool:
    mod = type(model).__module__ or ""
    if not (mod.startswith("torch") or "torch" in sys.modules):
        return False
    import torch

    return isinstance(model, torch.nn.Module)


def _keras_path(model: object, tmp: Path) -> str:
    if isinstance(model, (str, Path)):
        p = Path(model)
        if p.is_dir() and (p / "saved_model.pb").is_file():
            return str(p)
        if p.is_file() and p.suffix == ".keras":
            return str(p)
        raise DataError(f"{str(p)!r} is not a Keras model; expected a .keras file or a SavedModel directory")
    if hasattr(model, "save") and hasattr(model, "inputs"):  # an in-memory Keras model
        path = tmp / "model.keras"
        model.save(path)  # type: ignore[attr-defined]
        return str(path)
    raise ConfigError(
        f"export_tflite takes a torch nn.Module, a Keras model, or a .keras/SavedModel path; got {type(model).__name__}"
    )


def _export_torch_program(model: Any, sample: Any, path: Path) -> None:
    import torch

    model.eval()
    try:
        program = torch.export.export(model, (sample,))
    except Exception as err:
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise DataError(
            f"torch.export cannot trace the model, so litert-torch cannot convert it: {first[:300]}"
        ) from err
    torch.export.save(program, path)


class ConverterCrashed(RuntimeFailure):
    """The conversion child died: how (signal or exit code), and the last line it logged."""

    def __init__(self, how: str, log_tail: str) -> None:
        super().__init__(f"the TFLite converter crashed ({how}): {log_tail[:200]}")
        self.how = how
        self.log_tail = log_tail


class ConversionWorker:
    """The conversion child process: started ahead, reused for several conversions, restarted after a crash.

    The child imports its converter (litert-torch takes seconds) as soon as it starts, so a caller that starts
    the worker first and then loads its model and data pays for the import in parallel. Each conversion is a
    job directory handed over on the child's stdin.

    Args:
        source: ``torch`` or ``keras``: which converter the child imports ahead.
        timeout_s: a conversion that takes longer stops the child (the next one starts a fresh child).
        num_threads: the child's OpenMP threads (None: the libraries' default, one per core). Calibration runs
            one sample at a time through a small model, where more threads only add synchronisation when the
            cores are busy: an int8 export of the default CNN converted in 4.1-5.0 s with one thread against
            7.0-7.7 s with two on a loaded 2-core machine, but the same (8.26 vs 8.05 s, whole process) on a
            quiet one. ``fedge edge fit``, which converts many candidates while it trains, asks for one.

    Example::

        with ConversionWorker("torch") as worker:
            int8 = export_tflite(model, x_train, quantization="int8", worker=worker)
            fp32 = export_tflite(model, x_train, quantization="none", worker=worker)
    """

    def __init__(
        self, source: str = "torch", *, timeout_s: float = CONVERT_TIMEOUT_S, num_threads: int | None = None
    ) -> None:
        self.source = source
        self.timeout_s = timeout_s
        self.num_threads = num_threads
        self._proc: subprocess.Popen[str] | None = None
        self._log: Any = None
        self._ready = False
        self._jobs = 0
        self.start()

    def start(self) -> None:
        """Start the child if none is running (it begins importing its converter at once)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._close_log()
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the child
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, self.source],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=_child_env(self.num_threads),
        )
        self._ready = False

    def run(self, job_dir: Path) -> None:
        """Hand ``job_dir`` to the child and wait for its answer.

        Raises:
            RuntimeFailure: the child crashed (its last log line is quoted) or did not finish in time.
        """
        self.start()
        self._jobs += 1
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.write(f"{job_dir}\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died while starting: its exit status says how, below
        deadline = time.monotonic() + self.timeout_s
        while True:
            line = self._read_line(deadline)
            if line is None or line == "" or line.startswith("done "):
                break
            self._ready = self._ready or line == "ready"
        if line is None:
            self._stop()
            raise RuntimeFailure(f"the TFLite conversion did not finish within {self.timeout_s:.0f} s")
        if line == "":
            code = proc.wait()
            raise ConverterCrashed(f"signal {-code}" if code < 0 else f"exit code {code}", self._last_log_line())

    def _read_line(self, deadline: float) -> str | None:
        """The child's next line ('' at end of output), or None at the deadline."""
        import selectors

        assert self._proc is not None and self._proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                return None
        return self._proc.stdout.readline().strip() or ("" if self._proc.poll() is not None else "?")

    def _last_log_line(self) -> str:
        if self._log is None:
            return "no output"
        self._log.seek(0)
        return next((ln for ln in reversed(self._log.read().splitlines()) if ln.strip()), "no output")

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """End the child: closing its stdin lets it exit; one that does not, or never got a job, is killed."""
        proc = self._proc
        if self._jobs == 0:  # still importing its converter for nothing (the export failed first)
            self._stop()
        if proc is not None and proc.poll() is None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._stop()
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._close_log()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def export_tflite(
    model: object,
    sample_inputs: np.ndarray,
    *,
    quantization: Quantization | str = Quantization.NONE,
    calibration_samples: int = 200,
    timeout_s: float = CONVERT_TIMEOUT_S,
    worker: ConversionWorker | None = None,
) -> EdgeModel:
    """Convert ``model`` to TFLite with a fixed batch of 1.

    Args:
        model: a torch ``nn.Module`` (converted by litert-torch), a Keras model, or a path to a ``.keras``
            file or SavedModel directory (converted by TensorFlow's TFLite converter).
        sample_inputs: float32 samples, batch first, in the model's input layout. The first fixes the input
            shape; the first ``calibration_samples`` calibrate int8 quantization (use real training samples).
        quantization: ``none``, ``float16``, ``dynamic`` or ``int8``.
        calibration_samples: how many samples calibrate int8 activations.
        timeout_s: the conversion child process is stopped after this long (when no ``worker`` is given).
        worker: a started :class:`ConversionWorker` to convert in (reused across calls); else a child is
            started for this one conversion.

    Returns:
        The converted model; call it to compare with the source model.

    Raises:
        DataError: the model cannot be traced or converted (the message names the layer when it can).
        RuntimeFailure: the converter crashed or timed out.

    Example::

        edge = export_tflite(cnn, dataset.x_train, quantization="int8")
    """
    import numpy as np

    quant = Quantization.parse(str(quantization))
    samples = np.ascontiguousarray(np.asarray(sample_inputs, dtype=np.float32))
    if samples.ndim < 2 or len(samples) == 0:
        raise ConfigError(f"sample_inputs must be a batch of at least one sample; got shape {samples.shape}")
    if calibration_samples < 1:
        raise ConfigError(f"calibration_samples must be >= 1, got {calibration_samples}")
    source = "torch" if _is_torch_module(model) else "keras"
    with contextlib.ExitStack() as stack:
        if worker is None:
            worker = stack.enter_context(ConversionWorker(source, timeout_s=timeout_s))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedge-edge-")))
        job: dict[str, Any] = {"quantization": quant.value, "source": source}
        if source == "torch":
            import torch

            _export_torch_program(model, torch.as_tensor(samples[:1]), tmp / "program.pt2")
        else:
            job["path"] = _keras_path(model, tmp)
        np.save(tmp / "samples.npy", samples[:calibration_samples])
        (tmp / "job.json").write_text(json.dumps(job))
        return EdgeModel(data=_convert_job(worker, tmp, quant), quantization=quant)


def _convert_job(worker: ConversionWorker, job_dir: Path, quant: Quantization) -> bytes:
    """The .tflite bytes the worker makes of the job in ``job_dir``; its failure, as fedge's one line."""
    try:
        worker.run(job_dir)
    except ConverterCrashed as err:
        raise RuntimeFailure(
            f"the TFLite converter crashed ({err.how}) converting the model to {quant.value}: {err.log_tail[:200]}; "
            "try another --quantize, or simplify the layer named in the log"
        ) from err
    failure = read_failure(job_dir / FAILURE_FILE)
    if failure is not None:
        raise failure.to_error()
    if not (job_dir / "model.tflite").is_file():
        raise RuntimeFailure(f"the TFLite converter wrote no model converting to {quant.value}")
    return (job_dir / "model.tflite").read_bytes()
