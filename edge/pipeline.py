"""``fedge edge export`` as a function: load a trained model, convert it with an exporter plugin, verify it on
LiteRT (and TFLite Micro for int8 or a board), size its arena, check the board, write the run directory.

Example::

    report = export_model("runs/fl-20260101-120000", quantization="int8", target="arduino-nano-33-ble-sense")
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.config import from_mapping
from fedge.edge.boards import Board, check_fit, load_boards
from fedge.edge.convert import EdgeModel, Quantization
from fedge.errors import ConfigError, DataError, FedgeError, RuntimeFailure
from fedge.registry import Kind, Registry
from fedge.rundir import RunDir

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ExportConfig", "SourceModel", "Verification", "export_model", "load_source", "verify"]

_EXPORTER_FOR = {
    Quantization.NONE: "tflite-float32",
    Quantization.FLOAT16: "tflite-float16",
    Quantization.DYNAMIC: "tflite-dynamic",
    Quantization.INT8: "tflite-int8",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportConfig:
    """Settings of ``fedge edge export`` (flags, or keys of a TOML file)."""

    quantize: Quantization = Quantization.INT8
    """none, float16, dynamic or int8."""
    calibration_samples: int = 200
    """Training samples that calibrate int8 activations."""
    dataset: str = "digits"
    """Dataset plugin for calibration and held-out checks when model.json names none."""
    target: str | None = None
    """Board to check flash and RAM against (see ``fedge edge boards``)."""
    symbol: str = "g_model"
    """C name of the model array in model_data.cc."""

    def __post_init__(self) -> None:
        # Accept the plain string too: ExportConfig(quantize="int8").
        object.__setattr__(self, "quantize", Quantization.parse(str(self.quantize)))
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")


@dataclass(frozen=True, slots=True)
class SourceModel:
    """The model to export: a torch module or a Keras path, what it is, and the dataset it was trained on."""

    model: object
    kind: str
    """``torch`` or ``keras``."""
    description: str
    dataset: str | None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    """What model.json says the dataset was loaded with (``fedge fl run`` writes ``dataset_options``)."""


def load_source(path: str | Path) -> SourceModel:
    """A fedge run directory, a ``.pt`` beside a ``model.json``, a ``.keras`` file or a SavedModel directory.

    Raises:
        DataError: missing, unrecognised or corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"no model at {str(path)!r}; pass a fedge run directory, a .pt beside model.json, or a .keras file"
        )
    spec_file = (path if path.is_dir() else path.parent) / "model.json"
    if (path.is_dir() and (path / "model.pt").is_file()) or (path.is_file() and path.suffix == ".pt"):
        from fedge.plugins.models import load_model

        try:
            model = load_model(path)
        except DataError as err:  # torch's own reasons run over several lines
            raise DataError(str(err).splitlines()[0].rstrip(" :.")) from err
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        return SourceModel(
            model=model,
            kind="torch",
            description=f"fedge model {spec['model']!r}",
            dataset=spec.get("dataset"),
            dataset_options=dict(spec.get("dataset_options") or {}),
        )
    if (path.is_dir() and (path / "saved_model.pb").is_file()) or (path.is_file() and path.suffix == ".keras"):
        return SourceModel(model=str(path), kind="keras", description=f"Keras model {path.name}", dataset=None)
    raise DataError(
        f"{str(path)!r} is not a model fedge can export: expected a run directory with model.pt + model.json, "
        "a .pt beside a model.json, a .keras file or a SavedModel directory"
    )


def _keras_predict(path: str, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Outputs of a Keras model (or SavedModel) on ``x``, and the sample shape it takes."""
    import numpy as np

    from fedge.edge.runtimes import captured_stderr

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = Path(path)
    # TensorFlow's C++ start-up lines go to fd 2 whatever the log level; they are not news to a user.
    with captured_stderr():
        try:
            if p.is_dir():
                import tensorflow as tf

                fn = tf.saved_model.load(str(p)).signatures["serving_default"]
                shape = tuple(int(d) for d in next(iter(fn.structured_input_signature[1].values())).shape[1:])
                out = next(iter(fn(tf.constant(_to_layout(x, shape))).values()))
            else:
                import keras

                model = keras.models.load_model(p, compile=False)
                shape = tuple(int(d) for d in model.inputs[0].shape[1:])
                out = model.predict(_to_layout(x, shape), verbose=0)
        except DataError:
            raise
        except Exception as err:
            msg = f"cannot load the Keras model {str(p)!r} (corrupt?): {type(err).__name__}: {str(err)[:200]}"
            raise DataError(msg.splitlines()[0]) from err
    return np.asarray(out), shape


def _to_layout(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Dataset samples (channels first, as fedge's datasets give them) in a model's input layout."""
    import numpy as np

    if tuple(x.shape[1:]) == shape:
        return x
    if x.ndim == 4 and tuple(np.moveaxis(x, 1, -1).shape[1:]) == shape:  # NCHW -> NHWC for Keras
        return np.ascontiguousarray(np.moveaxis(x, 1, -1))
    if int(np.prod(x.shape[1:])) == int(np.prod(shape)):
        return x.reshape(len(x), *shape)
    raise DataError(f"the dataset's samples have shape {tuple(x.shape[1:])}, the model takes {shape}; pass --dataset")


def _agreement(litert: np.ndarray, tflm: np.ndarray) -> dict[str, Any]:
    import numpy as np

    diff = (
        np.abs(litert.astype(np.int64) - tflm.astype(np.int64)) if litert.dtype.kind in "iu" else np.abs(litert - tflm)
    )
    same_pred = int((litert.argmax(1) == tflm.argmax(1)).sum())
    return {
        "samples": len(litert),
        "same_predictions": same_pred,
        "identical_outputs": int((diff.reshape(len(diff), -1).max(1) == 0).sum()),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "agreed": same_pred == len(litert),
    }


@dataclass(frozen=True, slots=True)
class Verification:
    """What running the exported model on LiteRT (and TFLM) showed."""

    accuracy_exported: float
    runtimes: dict[str, Any]
    arena_bytes: int | None
    arena_min_bytes: int | None
    problem: FedgeError | None
    """Why the export must fail (ops TFLM lacks, TFLM failed, runtimes disagree), else None."""


def verify(edge: EdgeModel, x_test: np.ndarray, y_test: np.ndarray, *, require_tflm: bool) -> Verification:
    """Run ``edge`` on every held-out sample on LiteRT and, where TFLM can run it, on TFLite Micro; compare.

    With ``require_tflm`` (int8, or a board) a model TFLM cannot run is a problem, not a note.
    """
    from fedge.edge.runtimes import LITERT_KERNELS, find_arena_bytes, locate_divergence, run_litert, run_tflm

    info = edge.info()
    x_in = edge.quantize_inputs(x_test)
    litert_raw = run_litert(edge.data, x_in)
    accuracy = float((edge.dequantize_outputs(litert_raw).argmax(1) == y_test).mean())
    runtimes: dict[str, Any] = {"litert": {"ran": True, "kernels": LITERT_KERNELS.lower(), "accuracy": accuracy}}
    arena_bytes = arena_min = None
    problem: FedgeError | None = None
    if info.tflm_unsupported:
        reason = f"TFLite Micro has no kernel for op(s) {', '.join(info.tflm_unsupported)}"
        runtimes["tflm"] = {"ran": False, "reason": reason}
        if require_tflm:
            problem = DataError(
                f"{reason}, which this model uses; replace those layers, or export for LiteRT only "
                "(no --target, --quantize none/float16/dynamic)"
            )
    elif not edge.quantization.runs_on_tflm:
        runtimes["tflm"] = {"ran": False, "reason": f"TFLite Micro has no {edge.quantization.value} kernels"}
    else:
        try:
            arena_min, arena_bytes = find_arena_bytes(edge.data, x_in[:1])
            tflm_raw = run_tflm(edge.data, x_in, arena_bytes=arena_bytes)
        except RuntimeFailure as err:
            runtimes["tflm"] = {"ran": False, "reason": str(err)}
            problem = err if require_tflm else None
        else:
            agreement = _agreement(litert_raw, tflm_raw)
            differing = (litert_raw != tflm_raw).reshape(len(litert_raw), -1).any(axis=1)
            if differing.any():
                agreement["first_difference"] = locate_divergence(edge.data, x_in[differing])
            tflm_acc = float((edge.dequantize_outputs(tflm_raw).argmax(1) == y_test).mean())
            runtimes["tflm"] = {"ran": True, "accuracy": tflm_acc}
            runtimes["agreement"] = agreement
            if not agreement["agreed"]:
                problem = RuntimeFailure(
                    f"LiteRT and TFLite Micro disagree on {agreement['samples'] - agreement['same_predictions']} of "
                    f"{agreement['samples']} held-out samples (max difference {agreement['max_abs_diff']:g})"
                )
    # None: only one runtime ran, nothing to agree on.
    runtimes["agreed"] = runtimes["agreement"]["agreed"] if "agreement" in runtimes else None
    return Verification(accuracy, runtimes, arena_bytes, arena_min, problem)


def export_model(
    source: str | Path,
    config: ExportConfig | None = None,
    *,
    out: str | Path | None = None,
    boards: str | Path | None = None,
) -> dict[str, Any]:
    """Export, verify and write ``model.tflite``, ``model_data.cc/.h``, ``edge-report.json`` to a run directory.

    Returns:
        The report (also written as ``edge-report.json``), with ``run_dir`` added.

    Raises:
        DataError: missing/corrupt model, or ops TFLite Micro lacks (files are written first).
        ConfigError: unknown board or quantization, or the model does not fit the board (files written first).
        RuntimeFailure: the converter crashed, or LiteRT and TFLM disagree.
    """
    cfg = config or ExportConfig()
    board: Board | None = None
    if cfg.target is not None:
        known = load_boards(boards)
        if cfg.target not in known:
            raise ConfigError(
                f"unknown board {cfg.target!r}; valid: {', '.join(sorted(known))} (or add one with --boards FILE)"
            )
        board = known[cfg.target]
        if not cfg.quantize.runs_on_tflm:
            raise ConfigError(
                f"TFLite Micro on {board.name} cannot run {cfg.quantize.value} models (no float16 or hybrid kernels); "
                "use --quantize int8 or none"
            )
    src = load_source(source)
    from fedge.plugins.data import load_dataset

    dataset = load_dataset(src.dataset, src.dataset_options) if src.dataset else load_dataset(cfg.dataset)
    exporters: Registry[Any] = Registry(Kind.EXPORTER)
    plugin = exporters.get(_EXPORTER_FOR[cfg.quantize])
    c_array = exporters.get("c-array")

    # Source model on the held-out split.
    if src.kind == "torch":
        import torch

        x_train, x_test = dataset.x_train, dataset.x_test
        if tuple(x_train.shape[1:]) != tuple(src.model.fedge_spec["input_shape"]):  # type: ignore[attr-defined]
            raise DataError(
                f"dataset {dataset.name!r} has samples of shape {tuple(x_train.shape[1:])}, the model was built for "
                f"{tuple(src.model.fedge_spec['input_shape'])}; pass the --dataset it was trained on"  # type: ignore[attr-defined]
            )
        src.model.eval()  # type: ignore[attr-defined]
        with torch.no_grad():
            source_out = src.model(torch.as_tensor(x_test)).numpy()  # type: ignore[operator]
    else:
        source_out, shape = _keras_predict(str(src.model), dataset.x_test)
        x_train, x_test = _to_layout(dataset.x_train, shape), _to_layout(dataset.x_test, shape)
    accuracy_source = float((source_out.argmax(1) == dataset.y_test).mean())

    t0 = time.perf_counter()
    exporter_cfg = from_mapping(plugin.Config, {"calibration_samples": cfg.calibration_samples})
    edge: EdgeModel = plugin.export(src.model, x_train, exporter_cfg)
    convert_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    info = edge.info()
    check = verify(edge, x_test, dataset.y_test, require_tflm=cfg.quantize is Quantization.INT8 or board is not None)
    verify_s = time.perf_counter() - t1

    fit = check_fit(board, edge.size_bytes, check.arena_bytes) if board is not None else None
    report: dict[str, Any] = {
        "source": src.description,
        "source_kind": src.kind,
        "dataset": dataset.name,
        "quantization": cfg.quantize.value,
        "exporter": _EXPORTER_FOR[cfg.quantize],
        "size_bytes": edge.size_bytes,
        "arena_bytes": check.arena_bytes,
        "arena_min_bytes": check.arena_min_bytes,
        "ops": info.ops,
        "tflm_unsupported_ops": info.tflm_unsupported,
        "input": {"shape": info.inputs[0].shape, "dtype": info.inputs[0].dtype},
        "output": {"shape": info.outputs[0].shape, "dtype": info.outputs[0].dtype},
        "accuracy_source": accuracy_source,
        "accuracy_exported": check.accuracy_exported,
        "accuracy_drop_points": round(100 * (accuracy_source - check.accuracy_exported), 3),
        "held_out_samples": len(x_test),
        "runtimes": check.runtimes,
        "convert_s": round(convert_s, 3),
        "verify_s": round(verify_s, 3),
    }
    if board is not None and fit is not None:
        report["board"] = {
            "name": board.name,
            "flash_bytes": board.flash_bytes,
            "ram_bytes": board.ram_bytes,
            "notes": board.notes,
        }
        report["fits"] = fit.fits

    run = RunDir.create("edge", out)
    settings = {k: getattr(cfg, k) for k in ExportConfig.__dataclass_fields__}
    run.write_config(
        {
            "model": str(source),
            **{k: str(v) if isinstance(v, Quantization) else v for k, v in settings.items() if v is not None},
        }
    )
    edge.save(run.file("model.tflite"))
    for name, text in c_array.export(edge, from_mapping(c_array.Config, {"symbol": cfg.symbol})).items():
        run.write_text(name, text)
    run.write_json("edge-report.json", report)
    run.append_metrics(
        {
            "stage": "export",
            "convert_s": report["convert_s"],
            "verify_s": report["verify_s"],
            "size_bytes": edge.size_bytes,
        }
    )
    report["run_dir"] = str(run.path)
    if check.problem is not None:
        raise type(check.problem)(f"{check.problem} (report in {run.path})") from check.problem
    if fit is not None and not fit.fits:
        raise ConfigError(f"{fit.message()} (report in {run.path})")
    return report
