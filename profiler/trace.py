"""Loading torch.profiler (Kineto) Chrome-trace files into columnar arrays.

A trace is read in chunks: the ``traceEvents`` array is cut at event boundaries and each chunk is parsed
with msgspec into structs that keep only the needed keys (orjson when msgspec is not installed), so peak
memory is bounded by the chunk size plus the kept columns, whatever the file size.
Only the event kinds an analysis needs are kept (GPU kernels/memcpy/memset, runtime launches, CPU ops and
annotations); ``python_function``, flows, instants and metadata events are dropped as they are parsed.

Example::

    from fedge.profiler import load_trace, load_job

    trace = load_trace("traces/rank0.json.gz")
    job = load_job("traces/")            # one worker process per rank file
"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Self

import numpy as np
import orjson

from fedge.errors import DataError
from fedge.profiler.columns import Exact, FloatColumn, IntColumn, release_free_memory
from fedge.profiler.kinds import is_collective_op

__all__ = [
    "CHUNK_BYTES",
    "TRACE_FILE_LAYOUT",
    "FileError",
    "Job",
    "Table",
    "Trace",
    "find_trace_files",
    "load_job",
    "load_trace",
]

logger = logging.getLogger(__name__)

#: How ``fedge train --profile`` names per-rank files (tensorboard_trace_handler's names are read too).
TRACE_FILE_LAYOUT = "rank{rank}_trace.json.gz"
#: Bytes of decompressed JSON parsed at a time.
CHUNK_BYTES = 1 << 20

# Event categories kept, new and legacy (2021) Kineto spellings. Codes: GPU events < 10 <= CPU events.
KERNEL, MEMCPY, MEMSET = 0, 1, 2
CPU_OP, ANNOTATION, RUNTIME, GPU_ANNOTATION, DRIVER, LEGACY_RUNTIME = 10, 11, 12, 13, 14, 15
_CATEGORIES = {
    "kernel": KERNEL, "Kernel": KERNEL,
    "gpu_memcpy": MEMCPY, "Memcpy": MEMCPY,
    "gpu_memset": MEMSET, "Memset": MEMSET,
    "cpu_op": CPU_OP, "Operator": CPU_OP,
    "user_annotation": ANNOTATION,
    "gpu_user_annotation": GPU_ANNOTATION,
    "cuda_runtime": RUNTIME, "Runtime": LEGACY_RUNTIME, "cuda_driver": DRIVER,
}
#: Categories of the host calls that launch GPU work (a kernel finds its launch among them by correlation id).
#: They are told apart because torch-tb-profiler reads only the 2021 ``Runtime`` spelling.
LAUNCH_CATEGORIES = (RUNTIME, DRIVER, LEGACY_RUNTIME)
_STEP_RE = re.compile(r"^ProfilerStep\s*#\s*(\d+)")
_RANK_IN_NAME_RE = re.compile(r"(?:rank|worker)[-_]?(\d+)", re.IGNORECASE)


# Arg keys kept per event, as (attribute, key in the trace).
_ARG_FIELDS = (
    ("stream", "stream"), ("device", "device"), ("correlation", "correlation"), ("coll", "Collective name"),
    ("in_nelems", "In msg nelems"), ("out_nelems", "Out msg nelems"), ("group_size", "Group size"),
    ("dtype", "dtype"), ("pg_name", "Process Group Name"), ("pg_desc", "Process Group Description"),
    ("pg_ranks", "Process Group Ranks"), ("input_dims", "Input Dims"), ("input_type", "Input type"),
)
# The autograd op id that ties an op to its launches and kernels (legacy traces spell it in lower case).
_ID_FIELDS = (("ext", "External id"), ("ext_legacy", "external id"))
_EVENT_FIELDS = ("cat", "name", "ts", "dur", "pid", "tid")


class _PlainArgs:
    """The args the loader keeps, from a dict (fallback path)."""

    __slots__ = tuple(a for a, _ in _ARG_FIELDS + _ID_FIELDS)

    def __init__(self, args: dict[str, Any]) -> None:
        for attr, key in _ARG_FIELDS + _ID_FIELDS:
            setattr(self, attr, args.get(key, -1 if attr == "correlation" else None))


class _PlainEvent:
    """One event, from a dict (fallback path)."""

    __slots__ = (*_EVENT_FIELDS, "args")

    def __init__(self, e: dict[str, Any]) -> None:
        for attr in _EVENT_FIELDS:
            setattr(self, attr, e.get(attr))
        args = e.get("args")
        self.args = _PlainArgs(args) if isinstance(args, dict) else None


try:  # msgspec decodes straight into these structs, skipping unneeded keys: ~3x faster than orjson + dicts
    import msgspec

    _Args = msgspec.defstruct(
        "_Args",
        [(a, Any, msgspec.field(default=-1 if a == "correlation" else None, name=k)) for a, k in _ARG_FIELDS + _ID_FIELDS],
    )
    _Event = msgspec.defstruct("_Event", [(a, Any, None) for a in _EVENT_FIELDS] + [("args", _Args | None, None)])
    _DECODER: Any = msgspec.json.Decoder(list[_Event])  # type: ignore[valid-type]
except ImportError:  # optional: orjson alone gives the same result, slower
    msgspec = None  # type: ignore[assignment]
    _DECODER = None


class _BadCut(Exception):
    """The candidate chunk is not valid JSON."""


def _decode(text: bytes) -> list[Any]:
    if _DECODER is not None:
        try:
            return _DECODER.decode(text)  # type: ignore[no-any-return]
        except msgspec.ValidationError:
            pass  # valid JSON of an unexpected shape (args not an object...): take the general path
        except msgspec.DecodeError as err:
            raise _BadCut from err
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise _BadCut from err
    return [_PlainEvent(e) for e in raw if isinstance(e, dict)]


@dataclass(frozen=True, slots=True)
class Table:
    """Columns of equal length: ``ts``/``dur`` (µs, float64, exactly as written in the file; stored compactly,
    see :mod:`fedge.profiler.columns`, so each access decodes: take a subset with ``ts_at``/``end_at``),
    ``name`` (index into ``Trace.names``), ``cat`` (category code), ``tid`` (stream for GPU events), ``device``
    (-1 on CPU events), ``corr`` (correlation id, -1 if none; on the CPU side only launches keep theirs, stored
    sparsely as ``corr_rows``/``corr_values`` sorted by id), ``ext`` (``External id``: the op a launch or kernel
    belongs to, -1 if none). Integer columns take the narrowest dtype that holds their values, and one that holds
    a single value takes no memory (a read-only broadcast)."""

    ts_exact: Exact
    dur_exact: Exact
    name: np.ndarray
    cat: np.ndarray
    tid: np.ndarray
    device: np.ndarray
    ext: np.ndarray
    corr_values: np.ndarray
    corr_rows: np.ndarray | None = None

    @property
    def corr(self) -> np.ndarray:
        """Correlation id of every event (-1 if none)."""
        if self.corr_rows is None:
            return self.corr_values
        out = np.full(len(self), -1, dtype=self.corr_values.dtype)
        out[self.corr_rows] = self.corr_values
        return out

    def __len__(self) -> int:
        return len(self.cat)

    @property
    def ts(self) -> np.ndarray:
        """Start of every event (µs, float64)."""
        return self.ts_exact.get()

    @property
    def dur(self) -> np.ndarray:
        """Duration of every event (µs, float64)."""
        return self.dur_exact.get()

    def ts_at(self, rows: Any) -> np.ndarray:
        """Starts of ``rows`` (an index array, mask or slice) without decoding the whole column."""
        return self.ts_exact.get(rows)

    def end_at(self, rows: Any = None) -> np.ndarray:
        """``ts + dur`` of ``rows`` (of every event by default), as float64."""
        ts = self.ts_exact.get(rows)
        if ts is self.ts_exact.raw or ts.base is not None:  # the stored column or a view of it: never written
            return ts + self.dur_exact.get(rows)
        ts += self.dur_exact.get(rows)  # a fresh decode: added in place, one temporary column fewer
        return ts


@dataclass(frozen=True, slots=True)
class Trace:
    """One rank's profile, as columnar arrays.

    Attributes:
        path: the file it was read from.
        rank: the rank (from ``distributedInfo``, else the file name, else file order; see ``rank_source``).
        gpu: kernels, memcpy and memset events (``tid`` is the stream).
        cpu: CPU ops, user annotations and runtime/driver calls (launches carry ``corr``), plus the GPU-track
            copies of collective annotations (category ``GPU_ANNOTATION``; torch-tb-profiler counts them).
        names: event names; ``Table.name`` indexes it.
        steps: ``(ts, dur, number)`` of each ``ProfilerStep#N`` on the CPU track, sorted by ts.
        gpu_steps: the same on the GPU track (newer traces repeat steps there).
        comm_args: index into ``gpu`` or ``cpu`` (key ``("gpu", i)``/``("cpu", i)``) -> collective metadata
            from the event's args (``In msg nelems``, ``dtype``, ``Input Dims``...).
        metadata: top-level keys other than ``traceEvents`` (``distributedInfo`` without ``pg_config`` lists).
        base_us: ``baseTimeNanoseconds / 1000`` (0 if absent): absolute time = ts + base_us.
        launch_corr, launch_row: the correlation ids of the runtime calls that launch GPU work, sorted, and
            the ``cpu`` row of each (how a GPU event finds its launch).
        collective_names: per entry of ``names``, whether it names a collective CPU op (``is_collective_op``).
        notes: things the loader had to guess, for the report.
    """

    path: str
    rank: int
    rank_source: str
    world_size: int | None
    backend: str | None
    gpu: Table
    cpu: Table
    names: tuple[str, ...]
    steps: np.ndarray
    gpu_steps: np.ndarray
    comm_args: dict[tuple[str, int], dict[str, Any]]
    metadata: dict[str, Any]
    base_us: float
    launch_corr: np.ndarray
    launch_row: np.ndarray
    collective_names: np.ndarray
    notes: tuple[str, ...] = ()

    @property
    def has_gpu(self) -> bool:
        """Whether the trace holds any GPU kernel, memcpy or memset."""
        return len(self.gpu) > 0


@dataclass(frozen=True, slots=True)
class FileError:
    """A rank file that could not be read, and why (one line)."""

    path: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "error": self.message}


@dataclass(frozen=True, slots=True)
class Job:
    """All rank traces of one job, sorted by rank, plus the files that failed."""

    traces: tuple[Trace, ...]
    errors: tuple[FileError, ...] = ()

    @property
    def ranks(self) -> list[int]:
        return [t.rank for t in self.traces]


# --- reading ---------------------------------------------------------------------------------------


class _Inflate:
    """Streaming gzip reader on zlib directly (several times faster than gzip.GzipFile for this use);
    ``read(n)`` returns up to n bytes, b"" at the end; a stream cut short raises EOFError."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.pending = b""
        self.done = False

    def read(self, n: int = -1) -> bytes:
        parts, size = [self.pending], len(self.pending)
        while (n < 0 or size < n) and not self.done:
            data = self.raw.read(1 << 18)
            if not data:
                if not self.z.eof:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
                self.done = True
                break
            out = self.z.decompress(data)
            while self.z.eof and self.z.unused_data:  # concatenated gzip members
                rest = self.z.unused_data
                self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                out += self.z.decompress(rest)
            parts.append(out)
            size += len(out)
        blob = b"".join(parts)
        if n < 0:
            self.pending = b""
            return blob
        self.pending = blob[n:]
        return blob[:n]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()


def _open(path: Path) -> Any:
    f = open(path, "rb")  # noqa: SIM115 -- returned to the caller, who closes it
    magic = f.peek(2)[:2]  # peek, not seek: a pipe (``<(zcat ...)``) is read the same way
    return _Inflate(f) if magic == b"\x1f\x8b" else f


def _read(f: Any, n: int) -> bytes:
    try:
        data: bytes = f.read(n)
        return data
    except EOFError as err:
        raise DataError("truncated gzip stream (the profiler was probably killed while writing)") from err
    except zlib.error as err:
        raise DataError(f"corrupt gzip data ({err})") from err


def _next_char(buf: bytes, pos: int) -> bytes:
    return buf[pos : pos + 64].lstrip()[:1]


def _split_events(buf: bytes, start: int) -> tuple[list[Any], int] | None:
    """Parse the longest run of complete events in ``buf[start:]``; returns (events, end) or None.

    Candidate boundaries are ``}`` followed by ``,`` or ``]``; a candidate is right when the prefix parses
    as a JSON array (a cut inside a string or a nested object never does).
    """
    pos = len(buf)
    for _ in range(16):
        close = buf.rfind(b"}", start, pos)
        if close < 0:
            return None
        if _next_char(buf, close + 1) in (b",", b"]"):
            try:
                events = _decode(b"[" + buf[start : close + 1] + b"]")
            except _BadCut:
                pass
            else:
                return events, close + 1
        pos = close
    return None


def _iter_chunks(f: Any, chunk: int) -> Iterator[list[Any] | dict[str, Any]]:
    """Yield the top-level metadata dict first, then lists of raw events, then the trailing metadata dict."""
    buf = b""
    while True:  # header: everything before the traceEvents array
        data = _read(f, chunk)
        buf += data
        stripped = buf.lstrip()
        if stripped[:1] == b"[":  # bare Chrome-trace list
            yield {}
            buf = stripped[1:]
            break
        if stripped and stripped[:1] != b"{":
            raise DataError("not a JSON trace (expected an object with traceEvents)")
        key = buf.find(b'"traceEvents"')
        bracket = buf.find(b"[", key) if key >= 0 else -1
        if bracket >= 0:
            head = buf[:key].rstrip()
            head = head[:-1] if head.endswith(b",") else head
            try:
                header = orjson.loads(head + b"}")
            except orjson.JSONDecodeError as err:
                raise DataError(f"invalid JSON before traceEvents ({err})") from err
            yield header if isinstance(header, dict) else {}
            buf = buf[bracket + 1 :]
            break
        if not data:
            raise DataError("no traceEvents array found (empty, truncated or not a torch.profiler trace)")
    eof = False
    while True:
        if not eof and len(buf) < chunk:
            data = _read(f, chunk)
            eof = not data
            buf += data
        k, n = 0, len(buf)
        while k < n and buf[k] in b" \t\r\n,":
            k += 1
        if k < n and buf[k] == 0x5D:  # "]": end of traceEvents
            tail = (buf[k + 1 :] + _read(f, -1)).strip()
            if tail in (b"", b"}"):
                yield {}
                return
            try:
                rest = orjson.loads(b"{" + tail.lstrip(b",") if tail.startswith(b",") else tail)
            except orjson.JSONDecodeError as err:
                raise DataError(f"invalid JSON after traceEvents ({err})") from err
            yield rest if isinstance(rest, dict) else {}
            return
        found = _split_events(buf, k) if k < n else None
        if found is None:
            if eof:
                raise DataError(_why_no_events(buf[k:]))
            chunk *= 2  # one event larger than a chunk, or a cut we could not resolve: read more
            continue
        events, end = found
        buf = buf[end:]
        yield events


def _why_no_events(rest: bytes) -> str:
    try:
        orjson.loads(b"[" + rest)
    except orjson.JSONDecodeError:
        return "truncated or invalid JSON: the traceEvents array does not end properly"
    return "traceEvents holds values that are not events (expected objects with ph, name, ts)"


class _Columns:
    """Rows of one table: Python lists for the chunk being read, moved into compact columns after each chunk.
    ``with_device``: GPU tables. CPU events have no device (their ``device`` column is a -1 that takes no memory),
    and only launches keep a correlation id: there the ``device`` and ``corr`` lists hold launch rows and ids."""

    def __init__(self, *, with_device: bool) -> None:
        self.with_device = with_device
        self.lists: tuple[list[Any], ...] = tuple([] for _ in range(8))
        self.columns: tuple[FloatColumn | IntColumn, ...] = (
            FloatColumn(relative=True), FloatColumn(relative=False), *(IntColumn() for _ in range(6))
        )
        self.count = 0

    def flush(self) -> None:
        for values, column in zip(self.lists, self.columns):
            column.extend(values)  # type: ignore[arg-type]
            values.clear()

    def table(self) -> Table:
        self.flush()
        ts, dur, name, cat, tid, device, corr, ext = (c.finish() for c in self.columns)
        assert isinstance(ts, Exact) and isinstance(dur, Exact)
        if self.with_device:
            return Table(ts, dur, name, cat, tid, device, ext, corr)  # type: ignore[arg-type]
        # CPU: ``device`` and ``corr`` hold the rows and correlation ids of the launches, sorted here by id
        rows, values = device, corr
        by_corr = np.argsort(values, kind="stable")  # type: ignore[arg-type]
        return Table(ts, dur, name, cat, tid, np.broadcast_to(np.int8(-1), (self.count,)), ext,  # type: ignore[arg-type]
                     values[by_corr], rows[by_corr])  # type: ignore[index]


def _int_tid(tid: Any) -> int:
    if isinstance(tid, int):
        return tid
    digits = re.findall(r"\d+", str(tid))
    return int(digits[-1]) if digits else -1


def _comm_args(args: Any) -> dict[str, Any]:
    return {key: getattr(args, attr) for attr, key in _ARG_FIELDS[3:] if getattr(args, attr) is not None}


def _ext(args: Any) -> int:
    if args is None:
        return -1
    ext = args.ext_legacy if args.ext_legacy is not None else args.ext
    return ext if type(ext) is int else -1


def _ingest(
    events: list[Any],
    gpu: _Columns,
    cpu: _Columns,
    names: dict[str, int],
    flags: list[int],
    steps: list[tuple[float, float, int, bool]],
    comm_args: dict[tuple[str, int], dict[str, Any]],
) -> None:
    """Append the kept events of one chunk to the columns. ``flags[name id]``: 1 = ProfilerStep, 2 = collective op."""
    categories = _CATEGORIES
    g_ts, g_dur, g_name, g_cat, g_tid, g_dev, g_corr, g_ext = gpu.lists
    c_ts, c_dur, c_name, c_cat, c_tid, c_launch, c_corr, c_ext = cpu.lists
    for e in events:
        cat = e.cat
        code = categories.get(cat) if type(cat) is str else None
        if code is None:
            continue
        ts, dur = e.ts, e.dur
        if type(ts) not in (int, float) or type(dur) not in (int, float):
            continue
        name = e.name
        if type(name) is not str:
            name = str(name)
        nid = names.get(name)
        if nid is None:
            nid = names[name] = len(names)
            flags.append(1 if _STEP_RE.match(name) else 2 if is_collective_op(name) else 0)
        args = e.args
        if code < 10:
            stream = args.stream if args is not None else None
            if type(stream) is not int:
                stream = _int_tid(e.tid)
            device = args.device if args is not None else None
            if type(device) is not int:
                device = _int_tid(e.pid)
            corr = args.correlation if args is not None else -1
            if args is not None and (args.coll is not None or args.in_nelems is not None):
                comm_args[("gpu", gpu.count)] = _comm_args(args)
            g_ts.append(ts)
            g_dur.append(dur)
            g_name.append(nid)
            g_cat.append(code)
            g_tid.append(stream)
            g_dev.append(device)
            g_corr.append(corr if type(corr) is int else -1)
            g_ext.append(_ext(args))
            gpu.count += 1
            continue
        flag = flags[nid] if code < RUNTIME or code == GPU_ANNOTATION else 0
        if flag == 1:
            m = _STEP_RE.match(name)
            steps.append((float(ts), float(dur), int(m.group(1)) if m else -1, code == GPU_ANNOTATION))
        if code == GPU_ANNOTATION and flag != 2:  # GPU-track copies: only collectives' are kept (tb-profiler reads them)
            continue
        tid = e.tid
        if code in LAUNCH_CATEGORIES and args is not None:
            corr = args.correlation
            if type(corr) is int and corr >= 0:
                c_launch.append(cpu.count)
                c_corr.append(corr)
        if flag == 2 and args is not None:
            found = _comm_args(args)
            if found:
                comm_args[("cpu", cpu.count)] = found
        c_ts.append(ts)
        c_dur.append(dur)
        c_name.append(nid)
        c_cat.append(code)
        c_tid.append(tid if type(tid) is int else _int_tid(tid))
        c_ext.append(_ext(args))
        cpu.count += 1
    gpu.flush()
    cpu.flush()


def _small_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys, with huge process-group rank lists summarised (pg_config can list 300 ranks x 11)."""
    out = dict(meta)
    info = out.get("distributedInfo")
    if isinstance(info, dict) and isinstance(info.get("pg_config"), list):
        info = dict(info)
        info["pg_config"] = [
            {k: (len(v) if k == "ranks" and isinstance(v, list) else v) for k, v in pg.items()}
            for pg in info["pg_config"]
            if isinstance(pg, dict)
        ]
        out["distributedInfo"] = info
    props = out.get("deviceProperties")
    if isinstance(props, list):
        out["deviceProperties"] = [p.get("name", "") for p in props if isinstance(p, dict)]
    return out


def load_trace(path: str | os.PathLike[str], *, rank: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> Trace:
    """Read one torch.profiler trace (``.json`` or ``.json.gz``) into columnar arrays.

    Args:
        path: the trace file.
        rank: the rank to use when the file has no ``distributedInfo``; else the file name is tried.
        chunk_bytes: how much decompressed JSON is parsed at a time (bounds memory).

    Returns:
        The :class:`Trace`.

    Raises:
        DataError: the file is missing, empty, truncated or not a torch.profiler trace (one line, names it).

    Example::

        trace = load_trace("rank0_trace.json.gz")
        print(trace.rank, len(trace.gpu), "GPU events")
    """
    p = Path(path)
    try:
        return _load(p, rank, chunk_bytes)
    except DataError as err:
        raise DataError(f"{p}: {err}") from err
    except OSError as err:
        raise DataError(f"{p}: cannot read ({err.strerror or err})") from err
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as err:
        raise DataError(f"{p}: not a valid trace ({type(err).__name__}: {err})") from err


def _not_readable(p: Path) -> str | None:
    """Why ``p`` cannot be a trace file (a dangling link, a directory, nothing there), or None."""
    if p.is_symlink() and not p.exists():
        return f"a symbolic link to {os.readlink(p)}, which does not exist"
    if p.is_dir():
        return "a directory, not a trace file"
    if not p.exists():
        return "no such file"
    return None


def _rank_of(info: dict[str, Any], p: Path, rank: int | None) -> tuple[int, str]:
    """The rank and where it came from: ``distributedInfo``, else the file name, else the file order."""
    if isinstance(info.get("rank"), int):
        return int(info["rank"]), "distributedInfo"
    m = _RANK_IN_NAME_RE.search(p.name)
    if m:
        return int(m.group(1)), "file name"
    return (rank if rank is not None else 0), "file order"


def _load(p: Path, rank: int | None, chunk_bytes: int) -> Trace:
    problem = _not_readable(p)
    if problem:
        raise DataError(problem)
    gpu, cpu = _Columns(with_device=True), _Columns(with_device=False)
    names: dict[str, int] = {}
    flags: list[int] = []
    steps: list[tuple[float, float, int, bool]] = []
    comm_args: dict[tuple[str, int], dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    seen_events = False
    # The parsed events are short-lived and hold no cycles: the cyclic collector would only rescan them (each
    # chunk allocates ~10^5 objects), so it is paused while reading.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with _open(p) as f:
            for item in _iter_chunks(f, chunk_bytes):
                if isinstance(item, dict):
                    meta.update(item)
                else:
                    seen_events = True
                    _ingest(item, gpu, cpu, names, flags, steps, comm_args)
    finally:
        if collecting:
            gc.enable()
    if not seen_events:
        logger.debug("%s: traceEvents is empty", p)
    raw_info = meta.get("distributedInfo")
    info: dict[str, Any] = raw_info if isinstance(raw_info, dict) else {}
    found_rank, source = _rank_of(info, p, rank)
    notes = [] if source == "distributedInfo" else [f"{p.name}: no distributedInfo.rank; rank {found_rank} taken from the {source}"]
    base_ns = meta.get("baseTimeNanoseconds")
    step_arr = np.array(sorted((s[0], s[1], s[2]) for s in steps if not s[3]), dtype=np.float64).reshape(-1, 3)
    gpu_step_arr = np.array(sorted((s[0], s[1], s[2]) for s in steps if s[3]), dtype=np.float64).reshape(-1, 3)
    ordered = sorted(names, key=names.__getitem__)
    cpu_table = cpu.table()
    release_free_memory()
    return Trace(
        path=str(p),
        rank=found_rank,
        rank_source=source,
        world_size=info.get("world_size") if isinstance(info.get("world_size"), int) else None,
        backend=info.get("backend") if isinstance(info.get("backend"), str) else None,
        gpu=gpu.table(),
        cpu=cpu_table,
        names=tuple(ordered),
        steps=step_arr,
        gpu_steps=gpu_step_arr,
        comm_args=comm_args,
        metadata=_small_metadata(meta),
        base_us=float(base_ns) / 1000.0 if isinstance(base_ns, (int, float)) else 0.0,
        launch_corr=cpu_table.corr_values,
        launch_row=cpu_table.corr_rows,  # type: ignore[arg-type]
        collective_names=np.array([f == 2 for f in flags] or [False], dtype=bool),
        notes=tuple(notes),
    )


# --- jobs -------------------------------------------------------------------------------------------


def find_trace_files(path: str | os.PathLike[str]) -> list[Path]:
    """The trace files under ``path``: the file itself, or ``*.json``/``*.json.gz`` in a directory (not
    recursive, except that a run directory's ``traces/`` is used when the directory itself holds none;
    JSON that is clearly not a trace, such as a report beside the traces, is skipped).

    Raises:
        DataError: the path does not exist, or the directory holds no trace file.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: no such file or directory; give a trace file or a directory of per-rank traces")
    try:
        named = sorted(f for f in p.iterdir() if f.name.endswith((".json", ".json.gz")))
    except OSError as err:
        raise DataError(f"{p}: cannot list the directory ({err.strerror or err})") from err
    # What is named like a trace but cannot be read (a dangling link, a directory) is kept, so that the loader
    # reports it in ``errors`` instead of the rank silently missing.
    files = [f for f in named if _not_readable(f) or _looks_like_trace(f)]
    if not files and (p / "traces").is_dir():  # a run directory of `fedge train --profile`
        return find_trace_files(p / "traces")
    if not files:
        raise DataError(f"{p}: no trace files (*.json, *.json.gz) in this directory")
    return files


def _looks_like_trace(f: Path) -> bool:
    """Skip JSON files that are clearly not traces (a report beside them); anything doubtful is kept so the
    loader reports what is wrong with it."""
    if re.search(r"trace|rank|worker", f.name, re.IGNORECASE):
        return True
    try:
        with _open(f) as fh:
            head = fh.read(1 << 20)
    except (OSError, EOFError, zlib.error):
        return True
    return not (head.lstrip().startswith(b"{") and b'"traceEvents"' not in head and b'"ph"' not in head)


def _ignore_interrupts() -> None:
    # Workers leave Ctrl-C to the parent, which stops them: one line on the terminal, not one traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def _load_one(args: tuple[str, int, int]) -> Trace | FileError:
    path, order, chunk = args
    try:
        return load_trace(path, rank=order, chunk_bytes=chunk)
    except DataError as err:
        return FileError(path=path, message=str(err))
    except MemoryError:
        return FileError(path=path, message=f"{path}: out of memory while reading")


def load_job(
    path: str | os.PathLike[str], *, max_workers: int | None = None, chunk_bytes: int = CHUNK_BYTES
) -> Job:
    """Read every rank file of a job, one worker process per file (when there is more than one).

    A file that cannot be read becomes a :class:`FileError`; the other ranks are still loaded.

    Args:
        path: a trace file or a directory of per-rank trace files.
        max_workers: worker processes (default: min(files, CPUs)).
        chunk_bytes: see :func:`load_trace`.

    Raises:
        DataError: the path does not exist or holds no trace files.

    Example::

        job = load_job("runs/train-20250101-120000/traces")
        print(job.ranks, [e.message for e in job.errors])
    """
    files = find_trace_files(path)
    work = [(str(f), i, chunk_bytes) for i, f in enumerate(files)]
    if len(work) == 1:
        results = [_load_one(work[0])]
    else:
        workers = max_workers or min(len(work), os.cpu_count() or 1)
        results = []
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_interrupts)
        try:
            futures = [pool.submit(_load_one, w) for w in work]
            for w, future in zip(work, futures):
                try:
                    results.append(future.result())
                except BrokenProcessPool:  # a worker was killed (out of memory...): report, keep the others
                    results.append(FileError(path=w[0], message=f"{w[0]}: the worker reading it died (out of memory?)"))
        except BaseException:  # Ctrl-C: do not wait for the workers to finish their files
            _stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    traces = [r for r in results if isinstance(r, Trace)]
    errors = [r for r in results if isinstance(r, FileError)]
    seen: set[int] = set()
    fixed: list[Trace] = []
    for t in traces:
        if t.rank in seen:  # two files claim one rank: keep both, renumber the later by file order
            new = max(seen | {t.rank}) + 1
            note = f"{Path(t.path).name}: rank {t.rank} already taken by another file; using rank {new}"
            t = replace(t, rank=new, rank_source="file order", notes=(*t.notes, note))
        seen.add(t.rank)
        fixed.append(t)
    return Job(traces=tuple(sorted(fixed, key=lambda t: t.rank)), errors=tuple(errors))
