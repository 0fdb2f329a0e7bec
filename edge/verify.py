"""Verification of an exported model: every held-out sample on LiteRT and, where TFLite Micro can run it, on
TFLM; the arena TFLM needs; and whether the two runtimes agree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedge.errors import DataError, FedgeError, RuntimeFailure

if TYPE_CHECKING:
    import numpy as np

    from fedge.edge.convert import EdgeModel

__all__ = ["Verification", "verify"]


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


def _run_tflm(edge: EdgeModel, x_in: np.ndarray, y: np.ndarray, litert_raw: np.ndarray) -> dict[str, Any]:
    """TFLM's arena, accuracy and agreement with LiteRT (raises RuntimeFailure if TFLM cannot run it)."""
    from fedge.edge.runtimes import find_arena_bytes, locate_divergence, run_tflm

    arena_min, arena_bytes = find_arena_bytes(edge.data, x_in[:1])
    tflm_raw = run_tflm(edge.data, x_in, arena_bytes=arena_bytes)
    agreement = _agreement(litert_raw, tflm_raw)
    differing = (litert_raw != tflm_raw).reshape(len(litert_raw), -1).any(axis=1)
    if differing.any():
        agreement["first_difference"] = locate_divergence(edge.data, x_in[differing])
    accuracy = float((edge.dequantize_outputs(tflm_raw).argmax(1) == y).mean())
    return {"arena": (arena_bytes, arena_min), "tflm": {"ran": True, "accuracy": accuracy}, "agreement": agreement}


def verify(edge: EdgeModel, x_test: np.ndarray, y_test: np.ndarray, *, require_tflm: bool) -> Verification:
    """Run ``edge`` on every held-out sample on LiteRT and, where TFLM can run it, on TFLite Micro; compare.

    With ``require_tflm`` (int8, or a board) a model TFLM cannot run is a problem, not a note.
    """
    from fedge.edge.runtimes import LITERT_KERNELS, run_litert

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
            tflm = _run_tflm(edge, x_in, y_test, litert_raw)
        except RuntimeFailure as err:
            runtimes["tflm"] = {"ran": False, "reason": str(err)}
            problem = err if require_tflm else None
        else:
            (arena_bytes, arena_min), agreement = tflm["arena"], tflm["agreement"]
            runtimes["tflm"], runtimes["agreement"] = tflm["tflm"], agreement
            if not agreement["agreed"]:
                problem = RuntimeFailure(
                    f"LiteRT and TFLite Micro disagree on {agreement['samples'] - agreement['same_predictions']} of "
                    f"{agreement['samples']} held-out samples (max difference {agreement['max_abs_diff']:g})"
                )
    # None: only one runtime ran, nothing to agree on.
    runtimes["agreed"] = runtimes["agreement"]["agreed"] if "agreement" in runtimes else None
    return Verification(accuracy, runtimes, arena_bytes, arena_min, problem)
