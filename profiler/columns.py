"""Compact columns for the trace loader: each column grows in an anonymous memory map and is kept in the
narrowest encoding that gives every value back exactly.

Memory is what bounds the profiler on multi-GB traces, so a column costs only the rows written: pages of a
memory map are touched only as rows land in them, and growing it remaps pages instead of copying them (no
per-chunk parts to join at the end, nothing left behind on the heap). Integers take the smallest of
int8/int16/int32/int64 that holds them. Timestamps and durations (µs, float64 in the file's precision) are
kept as int32 steps of 1 µs or 1 ns from a base when that decodes to the very same float64 (whole-µs traces,
and ns-precision ones within ±2.1 s of the base), else as float64.
"""

from __future__ import annotations

import mmap
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Exact", "FloatColumn", "IntColumn", "release_free_memory"]

_INT_LADDER = (np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64))
_I32 = np.iinfo(np.int32)
_F64 = np.dtype(np.float64)


def release_free_memory() -> None:
    """Give freed heap pages back to the OS: glibc keeps them otherwise, and the parse buffers and temporary
    arrays freed along the way would stay in the peak RSS of what follows. No-op where malloc_trim does not exist."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


_REMAP = sys.platform.startswith("linux")
"""Whether anonymous maps can grow by remapping (CPython's ``mmap.resize`` of one needs Linux's mremap; macOS
raises SystemError, Windows has no MAP_PRIVATE): elsewhere a column grows as a numpy array (realloc)."""


class _Store:
    """Rows of one dtype in an anonymous memory map that grows by remapping (a numpy array where the OS has no
    ``mremap``)."""

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self.n = 0
        self.map: mmap.mmap | np.ndarray | None = None

    def append(self, values: np.ndarray) -> None:
        size = self.dtype.itemsize
        need = (self.n + len(values)) * size
        if self.map is None:
            first = max(need, 1 << 16)
            # Private: a shared anonymous map is a tmpfs file, which a remap past its first size makes fault.
            self.map = (
                mmap.mmap(-1, first, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                if _REMAP
                else np.empty(first // size, dtype=self.dtype)
            )
        elif need > _nbytes(self.map):
            _grow(self.map, max(need, 2 * _nbytes(self.map)), size)  # virtual size only: untouched pages cost nothing
        self._rows(len(values), self.n)[:] = values
        self.n += len(values)

    def _rows(self, count: int, start: int = 0) -> np.ndarray:
        assert self.map is not None
        if isinstance(self.map, np.ndarray):
            return self.map[start : start + count]
        return np.frombuffer(self.map, self.dtype, count=count, offset=start * self.dtype.itemsize)

    def view(self) -> np.ndarray:
        """The rows so far (to be dropped before the next append)."""
        if self.map is None or self.n == 0:
            return np.empty(0, dtype=self.dtype)
        return self._rows(self.n)

    def finish(self) -> np.ndarray:
        """The rows as one array, the map cut to their size."""
        if self.map is None or self.n == 0:
            return np.empty(0, dtype=self.dtype)
        _grow(self.map, self.n * self.dtype.itemsize, self.dtype.itemsize)
        return self._rows(self.n)


def _nbytes(store: mmap.mmap | np.ndarray) -> int:
    return store.nbytes if isinstance(store, np.ndarray) else len(store)


def _grow(store: mmap.mmap | np.ndarray, nbytes: int, itemsize: int) -> None:
    # Both resize in place: the caller holds no view of the rows across it.
    if isinstance(store, np.ndarray):
        store.resize(nbytes // itemsize, refcheck=False)
    else:
        store.resize(nbytes)


class IntColumn:
    """Integers, in the narrowest dtype that holds every value so far (widened, rarely, by one copy)."""

    def __init__(self) -> None:
        self.store = _Store(_INT_LADDER[0])

    def extend(self, values: list[int]) -> None:
        if len(values) == 0:
            return
        a = np.asarray(values, dtype=np.int64)
        lo, hi = int(a.min()), int(a.max())
        dtype = self.store.dtype
        if lo < np.iinfo(dtype).min or hi > np.iinfo(dtype).max:
            wide = next(d for d in _INT_LADDER if np.iinfo(d).min <= lo and hi <= np.iinfo(d).max)
            new = _Store(wide)
            new.append(self.store.view())
            self.store = new
        self.store.append(a)

    def finish(self) -> np.ndarray:
        values = self.store.finish()
        if len(values) > 1 and values[0] == values.min() == values.max():  # one value: no memory at all
            return np.broadcast_to(values[:1].copy(), values.shape)
        return values


@dataclass(frozen=True, slots=True)
class Exact:
    """A float64 column as stored: ``raw`` itself (``scale`` 0), or ``(raw + base) / scale`` with int32 ``raw``,
    which the loader only uses where it decodes to exactly the values read."""

    raw: np.ndarray
    scale: int = 0
    base: int = 0

    def __len__(self) -> int:
        return len(self.raw)

    def get(self, rows: Any = None) -> np.ndarray:
        """The float64 values, of every row or of ``rows`` (an index array, mask or slice)."""
        raw = self.raw if rows is None else self.raw[rows]
        return _decode(raw, self.scale, self.base)


def _decode(raw: np.ndarray, scale: int, base: int) -> np.ndarray:
    if scale == 0:
        return raw
    if scale == 1:  # whole µs: raw + base is exact in float64 below 2**53
        out = raw.astype(np.float64)
        out += base
        return out
    wide = raw.astype(np.int64)
    wide += base
    out = wide.astype(np.float64)
    out /= scale  # one correctly rounded division: the float64 nearest the decimal the file wrote
    return out


def _encode(a: np.ndarray, scale: int, base: int) -> np.ndarray | None:
    """``a`` as int32 steps of 1/scale µs from base, or None where that would not give ``a`` back exactly."""
    steps = np.rint(a * scale) if scale != 1 else np.rint(a)
    if not np.isfinite(steps).all() or np.abs(steps).max() >= 2.0**53:
        return None
    offsets = steps - base
    if offsets.min() < _I32.min or offsets.max() > _I32.max:
        return None
    raw = offsets.astype(np.int32)
    return raw if np.array_equal(_decode(raw, scale, base), a) else None


class FloatColumn:
    """µs values (float64 in the file) kept exactly in 4 bytes a row where possible (see the module docstring).

    ``relative``: the base is the first value read (timestamps); else 0 (durations).
    """

    def __init__(self, *, relative: bool) -> None:
        self.relative = relative
        self.scale, self.base = 1, 0
        self.started = False
        self.store = _Store(np.dtype(np.int32))

    def extend(self, values: list[float]) -> None:
        if len(values) == 0:
            return
        a = np.asarray(values, dtype=np.float64)
        if self.scale == 0:
            self.store.append(a)
            return
        if not self.started:
            self.started = True
            if self.relative and abs(a[0]) < 2.0**53:
                self.base = int(np.rint(a[0]))
        raw = _encode(a, self.scale, self.base)
        if raw is None:
            self._recode(a)
            return
        self.store.append(raw)

    def _recode(self, a: np.ndarray) -> None:
        """The current encoding cannot hold ``a``: move every row to the next one that can (ns steps, then
        float64)."""
        old = _decode(self.store.view(), self.scale, self.base)
        both = np.concatenate([old, a])
        del old
        if self.scale == 1:
            base = self.base * 1000
            raw = _encode(both, 1000, base)
            if raw is not None:
                self.scale, self.base = 1000, base
                self._replace(np.dtype(np.int32), raw)
                return
        self.scale, self.base = 0, 0
        self._replace(_F64, both)

    def _replace(self, dtype: np.dtype[Any], values: np.ndarray) -> None:
        new = _Store(dtype)
        new.append(values)
        self.store = new

    def finish(self) -> Exact:
        return Exact(self.store.finish(), self.scale, self.base)
