"""Unpickling verification ``.bin`` files without running anything they name.

An ordinary ``pickle.load`` calls whatever function a file names, so a crafted ``.bin``
runs code. This reader admits only what InsightFace-style files hold: tuples, lists,
bytes (Python 2 ``str`` read with ``encoding="bytes"``), bools, small ints and strings,
and one-dimensional numpy arrays or scalars of bool, uint8 or int8. numpy pickles those
through a few named functions (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``,
``_frombuffer``, under ``numpy.core`` before numpy 2 and ``numpy._core`` since) and
Python 3's protocol 2 stores bytes through ``_codecs.encode``. Each admitted name maps to
a stand-in here that checks its arguments and builds the value with ``np.frombuffer``:
numpy's own unpickling code never sees the file. Any other name, and any opcode that
builds other objects (dicts, sets, instances, persistent ids, extensions, out-of-band
buffers), is refused.

The opcode stream is first scanned with :mod:`pickletools`: every declared length must
fit in the file, memo indices and the number of opcodes are bounded by its size, so a
corrupt length field cannot make the unpickler allocate gigabytes before failing.
"""

from __future__ import annotations

import io
import pickle
import pickletools

import numpy as np

# The opcodes of protocols 0-5 that tuples, lists, bytes, bools, ints and numpy's reduce
# tuples need. Absent on purpose: dicts, sets, floats, INST/OBJ/NEWOBJ (instances),
# PERSID/BINPERSID, EXT1/2/4, NEXT_BUFFER/READONLY_BUFFER, LONG/LONG4 (unbounded ints).
ADMITTED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG1",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
})
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})

# Each opcode makes at most one small object (<= 64 bytes, bytes payloads aside): one
# opcode per 16 bytes of file bounds the objects to about 4x the file. An InsightFace file
# spends far more than 16 bytes per opcode (an encoded image per few opcodes).
_BYTES_PER_OPCODE = 16
_MIN_OPCODE_BUDGET = 4096

ADMITTED_DTYPES = {"b1": np.dtype(np.bool_), "u1": np.dtype(np.uint8), "i1": np.dtype(np.int8)}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names something other than what a verification file holds."""


class _NdarrayName:
    """Stands for ``numpy.ndarray`` as ``_reconstruct``'s first argument; not callable."""

    __slots__ = ()


_NDARRAY = _NdarrayName()


class _DtypeStandIn:
    """``numpy.dtype('b1' | 'u1' | 'i1')``; BUILD may only confirm it is a plain dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def __setstate__(self, state) -> None:
        # numpy's state: (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not (isinstance(state, tuple) and 5 <= len(state) <= 9 and all(item is None for item in state[2:5])):
            raise RefusedPickle(f"unexpected state for dtype {self.dtype}: {_describe(state)}")


class _Built:
    """A numpy value built here; held apart so that no BUILD ever reaches numpy's ``__setstate__``."""

    __slots__ = ("value",)

    def __init__(self, value=None):
        self.value = value

    def __setstate__(self, state) -> None:
        raise RefusedPickle("a state for an already built numpy value")


class _ArrayStandIn(_Built):
    """What ``_reconstruct`` returns; BUILD's state supplies the shape, dtype and bytes, once."""

    __slots__ = ()

    def __setstate__(self, state) -> None:
        if self.value is not None:
            raise RefusedPickle("a second state for one ndarray")
        # (version, shape, dtype, is_fortran, raw bytes); numpy before 1.0 left out the version
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise RefusedPickle(f"unexpected ndarray state: {_describe(state)}")
        shape, dtype, _, raw = state
        self.value = _array_from_bytes(raw, dtype, shape)


def _describe(value) -> str:
    # never repr() what the file built: it may be huge or nested a million deep
    size = f" of {len(value)} items" if isinstance(value, (tuple, list)) else ""
    return f"a {type(value).__name__}{size}"


def _plain_dtype(value) -> np.dtype:
    if not isinstance(value, _DtypeStandIn):
        raise RefusedPickle(f"expected a numpy dtype, got {type(value).__name__}")
    return value.dtype


def _array_from_bytes(raw, dtype, shape) -> np.ndarray:
    dtype = _plain_dtype(dtype)
    if not (isinstance(shape, tuple) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 0):
        raise RefusedPickle(f"expected the shape of a one-dimensional array, got {_describe(shape)}")
    if not isinstance(raw, (bytes, bytearray)):
        raise RefusedPickle(f"expected the array's bytes, got {type(raw).__name__}")
    if len(raw) != shape[0] * dtype.itemsize:
        raise RefusedPickle(f"array of {shape[0]} {dtype} items holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype).copy()  # a writable copy


def _dtype(name, align=False, copy=True) -> _DtypeStandIn:
    if isinstance(name, bytes):  # Python 2 pickles read with encoding="bytes"
        name = name.decode("ascii", errors="replace")
    if not isinstance(name, str) or name not in ADMITTED_DTYPES:
        shown = repr(name[:20]) if isinstance(name, str) else _describe(name)
        raise RefusedPickle(f"dtype {shown} is not one of {sorted(ADMITTED_DTYPES)}")
    return _DtypeStandIn(ADMITTED_DTYPES[name])


def _reconstruct(subtype, shape, typecode) -> _ArrayStandIn:
    if subtype is not _NDARRAY:
        raise RefusedPickle(f"_reconstruct of {type(subtype).__name__}, expected numpy.ndarray")
    if not (isinstance(shape, tuple) and shape == (0,) and isinstance(typecode, (bytes, str))):
        raise RefusedPickle(f"unexpected _reconstruct arguments: {_describe(shape)}, {_describe(typecode)}")
    return _ArrayStandIn()


def _frombuffer(buffer, dtype, shape, order) -> _Built:
    # protocol 5's form: the bytes come inline (BYTEARRAY8/BINBYTES), never out of band
    return _Built(_array_from_bytes(buffer, dtype, shape))


def _scalar(dtype, raw) -> _Built:
    dtype = _plain_dtype(dtype)
    if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise RefusedPickle(f"scalar of dtype {dtype} from {_describe(raw)}")
    return _Built(np.frombuffer(raw, dtype=dtype)[0])


def _latin1_encode(text, encoding):
    # How Python 3 writes bytes at protocols 0-2: _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle(f"unexpected _codecs.encode({_describe(text)}, {_describe(encoding)})")
    return text.encode("latin-1")


ADMITTED_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return ADMITTED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise RefusedPickle(f"refuses to load {f'{module}.{name}'[:120]}") from None

    def persistent_load(self, pid):
        raise RefusedPickle("refuses persistent ids")


def scan_opcodes(data: bytes) -> None:
    """Check the opcode stream of ``data`` before anything is built; raise RefusedPickle or ValueError."""
    budget = max(_MIN_OPCODE_BUDGET, len(data) // _BYTES_PER_OPCODE)
    stream = io.BytesIO(data)
    # genops reads each argument with read(n), which never returns more than the file has
    for count, (opcode, argument, position) in enumerate(pickletools.genops(stream)):
        if count >= budget:
            raise RefusedPickle(f"more than {budget} opcodes for {len(data)} bytes")
        if opcode.name not in ADMITTED_OPCODES:
            raise RefusedPickle(f"opcode {opcode.name} at byte {position} is not used by verification files")
        if opcode.name in _MEMO_PUTS and argument > count:
            raise RefusedPickle(f"memo index {argument} at byte {position} is out of range")
        if opcode.name == "FRAME" and argument > len(data) - stream.tell():
            raise RefusedPickle(f"frame of {argument} bytes at byte {position} runs past the end")


def restricted_loads(data: bytes):
    """Unpickle ``data`` admitting only tuples, lists, bytes, bools, ints, str and bool/uint8/int8 arrays.

    numpy arrays come back as writable one-dimensional arrays. Raises RefusedPickle,
    or whatever the unpickler raises for a malformed stream (UnpicklingError,
    ValueError, EOFError, ...); callers turn those into their own error.
    """
    scan_opcodes(data)
    result = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    return _unwrap(result, depth=3)


def _unwrap(value, depth: int):
    """Replace the stand-ins of numpy values with the values.

    Only ``depth`` levels are walked (the file's tuple, its two sequences, their
    items): deeper or self-referencing structures are left for the caller to refuse.
    """
    if isinstance(value, _Built):
        if value.value is None:
            raise RefusedPickle("an ndarray without its state")
        return value.value
    if isinstance(value, (_DtypeStandIn, _NdarrayName)):
        raise RefusedPickle(f"a bare {type(value).__name__.strip('_')} where data was expected")
    if isinstance(value, (list, tuple)) and depth > 1:
        return type(value)(_unwrap(item, depth - 1) for item in value)
    return value
