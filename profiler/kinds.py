"""Kernel classification: which GPU kernels compute, communicate or move memory, and which collective
a communication kernel or CPU op is.

Three classifications exist. ``fedge`` mode recognises collectives that are not named ``nccl*``
(symmetric-memory ``multimem_*`` all-reduce, DeepEP, vLLM custom all-reduce...) and takes memory
kernels from the event category. ``hta`` mode reproduces Holistic Trace Analysis 0.5.0: a name
starting with ``nccl`` is communication, a name containing ``Memcpy``/``Memset`` is memory, the rest
computation. ``tb-profiler`` mode reproduces torch-tb-profiler 0.4.3: a kernel is communication when it
belongs (by ``External id``) to one of the ops in ``TB_PROFILER_COLLECTIVES``, whatever its name.
"""

from __future__ import annotations

import re
from enum import IntEnum, StrEnum

__all__ = [
    "DTYPE_BYTES",
    "TB_PROFILER_COLLECTIVES",
    "KernelKind",
    "Mode",
    "classify_kernel",
    "collective_of_kernel",
    "collective_of_op",
    "is_collective_op",
]


class Mode(StrEnum):
    """Which definitions the analyses use."""

    FEDGE = "fedge"
    HTA = "hta"
    TB_PROFILER = "tb-profiler"


#: The only collective ops torch-tb-profiler 0.4.3 knows (its ``NcclOpNameSet`` and ``GlooOpNameSet``): a kernel
#: is communication there only when its ``External id`` is one of theirs.
TB_PROFILER_COLLECTIVES = frozenset(
    f"{lib}:{op}" for lib in ("nccl", "gloo") for op in ("broadcast", "reduce", "all_reduce", "all_gather", "reduce_scatter")
)


class KernelKind(IntEnum):
    """What a GPU kernel does. The values are bit positions for overlap masks."""

    COMPUTATION = 0
    COMMUNICATION = 1
    MEMORY = 2


_COMM_RE = re.compile(
    r"^(nccl|rccl|msccl)|multimem_|(one|two)_shot_all_reduce|cross_device_reduce|dpsk::ep::|deep_ep::"
    r"|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all",
    re.IGNORECASE,
)


def classify_kernel(name: str, *, is_memory_event: bool, mode: Mode) -> KernelKind:
    """Classify one GPU event by its name (and, in fedge mode, by whether it is a memcpy/memset event)."""
    if mode is Mode.HTA:
        if name.startswith("nccl"):
            return KernelKind.COMMUNICATION
        if "Memcpy" in name or "Memset" in name:
            return KernelKind.MEMORY
        return KernelKind.COMPUTATION
    if is_memory_event:
        return KernelKind.MEMORY
    if _COMM_RE.search(name):
        return KernelKind.COMMUNICATION
    return KernelKind.COMPUTATION


# Canonical collective names, as torch.distributed calls them.
_CANONICAL = {
    "allreduce": "all_reduce",
    "allgather": "all_gather",
    "allgatherbase": "all_gather",
    "allgatherintocoalesced": "all_gather",
    "allgatherintotensorcoalesced": "all_gather",
    "reducescatter": "reduce_scatter",
    "reducescatterbase": "reduce_scatter",
    "reducescattertensorcoalesced": "reduce_scatter",
    "alltoall": "all_to_all",
    "alltoallbase": "all_to_all",
    "alltoallv": "all_to_all",
    "sendrecv": "send_recv",
    "send": "send_recv",
    "recv": "send_recv",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "gather": "gather",
    "scatter": "scatter",
    "barrier": "barrier",
    "multimemallreduce": "all_reduce",
    "oneshotallreduce": "all_reduce",
    "twoshotallreduce": "all_reduce",
    "crossdevicereduce": "all_reduce",
}


def canonical_collective(raw: str) -> str:
    """``allreduce``, ``AllReduce``, ``_allgather_base`` -> ``all_reduce``, ``all_gather``; unknown stays as given."""
    key = re.sub(r"[^a-z]", "", raw.lower())
    key = key.removesuffix("coalesced") if key not in _CANONICAL else key
    return _CANONICAL.get(key, raw.lower() or "unknown")


_NCCL_KERNEL_RE = re.compile(r"^nccl(?:Dev)?Kernel_([A-Za-z]+)")
_SYMM_RE = re.compile(r"(multimem_all_reduce|one_shot_all_reduce|two_shot_all_reduce|cross_device_reduce)")


def collective_of_kernel(name: str) -> str:
    """The collective a communication kernel runs, from its name; ``unknown`` when the name does not say
    (RCCL's ``ncclDevKernel_Generic``)."""
    m = _NCCL_KERNEL_RE.match(name)
    if m:
        return "unknown" if m.group(1) == "Generic" else canonical_collective(m.group(1))
    m = _SYMM_RE.search(name)
    if m:
        return "all_reduce"
    low = name.lower()
    for key in ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "reducescatter", "all_to_all", "alltoall"):
        if key in low:
            return canonical_collective(key)
    return "unknown"


_OP_RE = re.compile(r"^(?:c10d::|nccl:|gloo:|rccl:|mpi:|ucc:)_?([A-Za-z_]+?)_?$")


def is_collective_op(name: str) -> bool:
    """A CPU op or annotation that issues or runs a collective (``c10d::allreduce_``, ``nccl:all_reduce``,
    ``gloo:all_reduce``, ``record_param_comms``)."""
    return name == "record_param_comms" or (_OP_RE.match(name) is not None and not name.startswith("c10d::monitored"))


def collective_of_op(name: str) -> str:
    """``c10d::allreduce_`` / ``nccl:all_reduce`` / ``gloo:all_reduce`` -> ``all_reduce``."""
    m = _OP_RE.match(name)
    return canonical_collective(m.group(1)) if m else "unknown"


# Bytes per element for the dtype spellings found in traces (record_param_comms ``dtype``, ``Input type``,
# NCCL kernel name suffixes).
DTYPE_BYTES = {
    "float": 4, "float32": 4, "double": 8, "float64": 8, "half": 2, "float16": 2, "bfloat16": 2,
    "int": 4, "int32": 4, "int32_t": 4, "uint32_t": 4, "long": 8, "int64": 8, "int64_t": 8, "uint64_t": 8,
    "short": 2, "int16": 2, "char": 1, "signed char": 1, "int8": 1, "int8_t": 1, "byte": 1, "unsigned char": 1,
    "uint8": 1, "uint8_t": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
    "c10::half": 2, "c10::bfloat16": 2, "__nv_bfloat16": 2,
}


def dtype_bytes(dtype: str | None) -> int | None:
    """Size of one element of ``dtype`` (any spelling above, case-insensitive), or None if unknown."""
    if not dtype:
        return None
    return DTYPE_BYTES.get(dtype.strip().lower())


def dtype_of_kernel(name: str) -> str | None:
    """The element type an NCCL kernel name ends with (``..._Sum_float(...)`` -> ``float``)."""
    m = re.match(r"^nccl(?:Dev)?Kernel_[A-Za-z]+_[A-Za-z]+_[A-Za-z0-9]+_[A-Za-z]+_([A-Za-z0-9_]+?)(?:\(|$)", name)
    return m.group(1) if m else None
