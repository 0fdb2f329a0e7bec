"""What a ``.tflite`` file holds (ops, tensors, quantization) and which of its ops TFLite Micro lacks.

Reads the flatbuffer with the schema module ``tflite_micro`` ships (the one TFLM's own Python runtime uses; the
``tflite`` package's older schema misreads op codes that ai-edge-quantizer writes). TensorFlow is never imported.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from fedge.errors import DataError

__all__ = ["TFLM_BUILTIN_OPS", "ModelInfo", "TensorInfo", "inspect_tflite"]

# Builtin ops the TFLite Micro op resolver registers (tflite-micro: python/tflite_micro/python_ops_resolver.cc).
# TFLM supports only some dtypes of some of them (no int8 EXP, no float16 or hybrid kernels); the runtime is
# the final judge, this set gives the early, readable answer.
TFLM_BUILTIN_OPS = frozenset(
    [
        "ABS",
        "ADD",
        "ADD_N",
        "ARG_MAX",
        "ARG_MIN",
        "ASSIGN_VARIABLE",
        "AVERAGE_POOL_2D",
        "BATCH_TO_SPACE_ND",
        "BROADCAST_ARGS",
        "BROADCAST_TO",
        "CALL_ONCE",
        "CAST",
        "CEIL",
        "CONCATENATION",
        "CONV_2D",
        "COS",
        "CUMSUM",
        "DEPTH_TO_SPACE",
        "DEPTHWISE_CONV_2D",
        "DEQUANTIZE",
        "DETECTION_POSTPROCESS",
        "DIV",
        "ELU",
        "EQUAL",
        "EXP",
        "EXPAND_DIMS",
        "FILL",
        "FLOOR",
        "FLOOR_DIV",
        "FLOOR_MOD",
        "FULLY_CONNECTED",
        "GATHER",
        "GATHER_ND",
        "GREATER",
        "GREATER_EQUAL",
        "HARD_SWISH",
        "IF",
        "L2_NORMALIZATION",
        "L2_POOL_2D",
        "LEAKY_RELU",
        "LESS",
        "LESS_EQUAL",
        "LOG",
        "LOGICAL_AND",
        "LOGICAL_NOT",
        "LOGICAL_OR",
        "LOGISTIC",
        "LOG_SOFTMAX",
        "MAX_POOL_2D",
        "MAXIMUM",
        "MEAN",
        "MINIMUM",
        "MIRROR_PAD",
        "MUL",
        "NEG",
        "NOT_EQUAL",
        "PACK",
        "PAD",
        "PADV2",
        "PRELU",
        "QUANTIZE",
        "READ_VARIABLE",
        "REDUCE_MAX",
        "RELU",
        "RELU6",
        "RESHAPE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "ROUND",
        "RSQRT",
        "SELECT_V2",
        "SHAPE",
        "SIN",
        "SLICE",
        "SOFTMAX",
        "SPACE_TO_BATCH_ND",
        "SPACE_TO_DEPTH",
        "SPLIT",
        "SPLIT_V",
        "SQRT",
        "SQUARE",
        "SQUARED_DIFFERENCE",
        "SQUEEZE",
        "STRIDED_SLICE",
        "SUB",
        "SUM",
        "SVDF",
        "TANH",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
        "UNIDIRECTIONAL_SEQUENCE_LSTM",
        "UNPACK",
        "VAR_HANDLE",
        "WHILE",
        "ZEROS_LIKE",
    ]
)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor: name, shape, dtype and (for quantized tensors) scales and zero points."""

    index: int
    name: str
    shape: list[int]
    dtype: str
    scales: list[float] = field(default_factory=list)
    zero_points: list[int] = field(default_factory=list)
    is_constant: bool = False


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The structure of a ``.tflite`` model (first subgraph) and its TFLM op support."""

    size_bytes: int
    ops: dict[str, int]
    """Op name -> how many times it occurs."""
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    tensors: list[TensorInfo]
    tflm_unsupported: list[str]
    """Ops the TFLite Micro runtime has no kernel for (custom and Flex ops included)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _enum_names(enum_cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def operator_names(model: Any) -> list[str]:
    """The op of each operator of the first subgraph, in execution order (``CONV_2D``, ``CUSTOM:name``).

    Args:
        model: a parsed flatbuffer (``schema_py_generated.Model``).
    """
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb

    op_table = _enum_names(fb.BuiltinOperator)
    graph = model.Subgraphs(0)
    names = []
    for i in range(graph.OperatorsLength()):
        code = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = op_table.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            custom = code.CustomCode()
            name = f"CUSTOM:{custom.decode() if custom else '?'}"
        names.append(name)
    return names


def inspect_tflite(data: bytes) -> ModelInfo:
    """Parse a ``.tflite`` flatbuffer.

    Raises:
        DataError: the bytes are not a TFLite model.

    Example::

        info = inspect_tflite(Path("model.tflite").read_bytes())
        info.ops, info.tflm_unsupported
    """
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb

    if len(data) < 8 or data[4:8] != b"TFL3":
        raise DataError("not a TFLite model: the file lacks the 'TFL3' flatbuffer identifier; pass a .tflite file")
    try:
        model = fb.Model.GetRootAsModel(data, 0)
        graph = model.Subgraphs(0)
        type_names = {k: v.lower() for k, v in _enum_names(fb.TensorType).items()}
        op_names = operator_names(model)
        tensors = []
        for i in range(graph.TensorsLength()):
            t = graph.Tensors(i)
            q = t.Quantization()
            scales = [float(s) for s in q.ScaleAsNumpy()] if q is not None and q.ScaleLength() else []
            zps = [int(z) for z in q.ZeroPointAsNumpy()] if q is not None and q.ZeroPointLength() else []
            buf = model.Buffers(t.Buffer())
            tensors.append(
                TensorInfo(
                    index=i,
                    name=(t.Name() or b"").decode(errors="replace"),
                    shape=[int(d) for d in t.ShapeAsNumpy()] if t.ShapeLength() else [],
                    dtype=type_names.get(t.Type(), str(t.Type())),
                    scales=scales,
                    zero_points=zps,
                    is_constant=bool(buf is not None and (buf.DataLength() or buf.Size())),
                )
            )
        inputs = [tensors[graph.Inputs(i)] for i in range(graph.InputsLength())]
        outputs = [tensors[graph.Outputs(i)] for i in range(graph.OutputsLength())]
    except Exception as err:  # flatbuffers raises struct/index errors on truncated files
        raise DataError(f"cannot read the TFLite model (corrupt or truncated?): {type(err).__name__}: {err}") from err
    counts = Counter(op_names)
    unsupported = sorted(n for n in counts if n not in TFLM_BUILTIN_OPS)
    return ModelInfo(
        size_bytes=len(data),
        ops=dict(sorted(counts.items())),
        inputs=inputs,
        outputs=outputs,
        tensors=tensors,
        tflm_unsupported=unsupported,
    )
