"""The bounded allow-list unpickler of CIFAR python batches (a pickle from someone else is data).

Only the globals a CIFAR batch refers to resolve, each to a guarded stand-in that checks its
arguments (no ``numpy.ndarray(shape)`` of any size, plain numeric dtypes only, latin-1 ``_codecs``);
the pure-Python unpickler counts every opcode (at most :data:`MAX_PICKLE_OPS`), and the object it
builds is walked before anything else touches it (at most :data:`MAX_PICKLE_DEPTH` levels and
:data:`MAX_PICKLE_ELEMENTS` elements, a shared container counted each time it is reached). The file
itself is read size-capped by :mod:`probe.data.cifar`.
"""
from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from probe.errors import DataError

__all__ = ["load_cifar_pickle", "MAX_PICKLE_OPS", "MAX_PICKLE_DEPTH", "MAX_PICKLE_ELEMENTS"]

MAX_PICKLE_OPS = 2_000_000  # opcodes per pickle; each creates at most one small object
MAX_PICKLE_DEPTH = 16  # container nesting (a batch: dict -> list -> bytes is 2)
MAX_PICKLE_ELEMENTS = 4_000_000  # container elements visited, a shared container each time it is reached


class _Refused(pickle.UnpicklingError):
    """Something a CIFAR batch never holds; refused without running or building it."""


class _NdarrayRef:
    """Stands for ``numpy.ndarray`` inside a pickle: only the guarded ``_reconstruct`` accepts it, so a
    pickle cannot call ``numpy.ndarray(shape)`` (an uninitialised array of any size) itself."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("refused a direct numpy.ndarray(...) call")


def _plain_dtype(d: Any) -> np.dtype:
    """A fresh canonical copy of a numeric dtype (bool, int, uint, float, complex).

    Arrays and scalars are built with this copy, never with the pickle's own dtype object: a later BUILD
    on that object (``dtype.__setstate__``) could otherwise change the flags or item size of an array
    that already uses it.
    """
    if not isinstance(d, np.dtype):
        raise _Refused(f"refused a {type(d).__name__} where a dtype belongs")
    if d.kind not in "biufc" or d.fields is not None or d.subdtype is not None:
        raise _Refused(f"refused dtype {d.str} (a CIFAR batch holds plain numeric arrays only)")
    return np.dtype(d.str)


def _guarded_dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    # Only a type code such as 'u1' (what numpy writes), never a structured spec; and always a private copy
    # (copy=True): a BUILD on the pickle's dtype must never reach numpy's shared singletons such as
    # np.dtype('u1').  Messages name types and type codes only: repr() of a pickle's own objects can be
    # exponentially long.
    if type(obj) not in (str, bytes) or len(obj) > 64:
        raise _Refused(f"refused numpy.dtype of a {type(obj).__name__} (numpy writes a short type code)")
    d = np.dtype(obj, bool(align), True)
    if d.hasobject:
        raise _Refused(f"refused object dtype {d.str}")
    return d


def _guarded_numpy(name: str) -> Callable[..., Any]:
    """The numpy pickle helpers a batch refers to, with their arguments checked first."""
    if name == "_reconstruct":
        real = _numpy_internal("multiarray", "_reconstruct")

        def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
            # numpy always writes _reconstruct(ndarray, (0,), b'b'): an empty placeholder that the BUILD
            # which follows fills.  Any other shape would only allocate uninitialised memory.
            if subtype is not _NdarrayRef:
                raise _Refused(f"refused _reconstruct of a {type(subtype).__name__}")
            return real(np.ndarray, (0,), np.dtype("b"))

        return _reconstruct
    if name == "scalar":
        real = _numpy_internal("multiarray", "scalar")

        def scalar(dtype: Any, data: Any = None) -> Any:
            d = _plain_dtype(dtype)
            if not isinstance(data, bytes) or len(data) != d.itemsize:
                raise _Refused(f"refused numpy scalar of {d} from {type(data).__name__}")
            return real(d, data)

        return scalar
    if name == "_frombuffer":
        real = _numpy_internal("numeric", "_frombuffer")

        def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
            if not isinstance(buf, (bytes, bytearray)) or not _int_tuple(shape) or order not in ("C", "F"):
                raise _Refused(f"refused _frombuffer over a {type(buf).__name__}")
            return real(buf, _plain_dtype(dtype), shape, order)

        return _frombuffer
    raise _Refused(f"refused numpy.{name}")


def _int_tuple(shape: Any) -> bool:
    return type(shape) is tuple and all(type(n) is int and n >= 0 for n in shape)


def _latin1_encode(obj: Any, encoding: Any = None, errors: Any = None) -> bytes:
    """``_codecs.encode`` as Python 3 writes bytes at protocol <= 2: ``encode(str, 'latin1')``.  Other
    codecs (punycode is quadratic, zlib/bz2 compress) are refused."""
    if type(obj) is not str or encoding not in ("latin1", "latin-1") or errors not in (None, "strict"):
        codec = repr(encoding[:40]) if type(encoding) is str else f"a {type(encoding).__name__}"
        raise _Refused(f"refused _codecs.encode(<{type(obj).__name__}>, {codec})")
    return obj.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as Python 3 writes an empty bytes object at protocol <= 2 (e.g. an empty array's data);
    ``bytes(n)`` would allocate ``n`` bytes."""
    if args:
        raise _Refused("refused bytes(...) with arguments")
    return b""


_CIFAR_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: _NdarrayRef,
    ("numpy", "dtype"): lambda: _guarded_dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,  # bytes written by Python 3 at protocol <= 2
    ("__builtin__", "bytes"): lambda: _empty_bytes,
    ("builtins", "bytes"): lambda: _empty_bytes,
    **{(f"numpy.{core}.{sub}", attr): (lambda attr=attr: _guarded_numpy(attr))
       for core in ("core", "_core")
       for sub, attr in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))},
}


def _count_opcode(load: Callable[[Any], None]) -> Callable[[Any], None]:
    def op(self: _CifarUnpickler) -> None:
        self._ops += 1
        if self._ops > MAX_PICKLE_OPS:
            raise _Refused(f"more than {MAX_PICKLE_OPS} pickle opcodes (MAX_PICKLE_OPS)")
        load(self)

    return op


class _CifarUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickler that builds only what a CIFAR python batch holds, with every opcode counted.

    It is the pure-Python unpickler, because the C one cannot be bounded: ``LONG_BINPUT 10**9`` (a
    7-byte pickle) makes it allocate an 8 GB memo, 20 MB of ``EMPTY_LIST`` opcodes become 1.6 GB of
    lists, and numpy's ``ndarray.__setstate__`` crashes the process on an object array whose list is
    shorter than its shape.  Here: globals resolve only to the guarded numpy / codecs helpers above; at
    most :data:`MAX_PICKLE_OPS` opcodes; memo indices below that; dict keys bytes or str (no int keys
    built to collide in the hash table); no sets, no instance-building opcodes, and BUILD only on numpy
    arrays (plain numeric dtypes) and dtypes.  Shared references (a few bytes each) can still describe
    an exponentially large tree: :func:`_check_pickle_tree` walks the result with a budget.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="bytes")
        self._ops = 0

    def find_class(self, module: str, name: str) -> Any:
        make = _CIFAR_GLOBALS.get((module, name))
        if make is None:
            raise _Refused(f"refused global {module[:100]}.{name[:100]}")
        return make()

    def _refuse(self) -> None:
        raise _Refused("refused a set or an instance-building opcode (not part of a CIFAR batch)")

    def _load_put(self) -> None:  # text PUT: an arbitrary integer, e.g. many that collide in the memo dict
        i = int(self.readline()[:-1])
        if not 0 <= i < MAX_PICKLE_OPS:
            raise _Refused(f"memo index {i} outside [0, {MAX_PICKLE_OPS})")
        self.memo[i] = self.stack[-1]

    def _load_bytearray8(self) -> None:  # the stock one allocates the declared length before reading
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)
        if len(data) != n:
            raise EOFError(f"BYTEARRAY8 declares {n} bytes, {len(data)} present")
        self.append(bytearray(data))

    def _check_dict(self, d: Any, keys: Any) -> None:
        if type(d) is not dict:
            raise _Refused(f"refused setting items on {type(d).__name__}")
        for k in keys:
            if type(k) not in (bytes, str):
                raise _Refused(f"refused dict key of type {type(k).__name__} (CIFAR batches have bytes/str keys)")

    def _load_setitem(self) -> None:
        self._check_dict(self.stack[-3], (self.stack[-2],))
        pickle._Unpickler.load_setitem(self)  # type: ignore[attr-defined]

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        self._check_dict(self.stack[-1], items[::2])
        d = self.stack[-1]
        for i in range(0, len(items), 2):
            d[items[i]] = items[i + 1]

    def _load_dict(self) -> None:
        items = self.pop_mark()
        self._check_dict({}, items[::2])
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            # (version, byte order, subarray, names, fields, item size, alignment, flags[, metadata]):
            # a plain dtype has no subarray, names, fields or metadata.  The byte order is bytes in
            # Python 2's files (a py2 str read with encoding="bytes").
            if not (type(state) is tuple and len(state) in (8, 9) and type(state[1]) in (str, bytes)
                    and state[2:5] == (None, None, None) and all(type(v) is int for v in state[5:8])
                    and state[8:] in ((), (None,))):
                raise _Refused("refused a dtype state other than a plain numeric dtype's")
            inst.__setstate__(state)
            if inst.hasobject:
                raise _Refused("refused a dtype state that marks the dtype as holding objects")
        elif type(inst) is np.ndarray:
            # (version, shape, dtype, is_fortran, data) or (shape, dtype, is_fortran, data)
            k = len(state) - 3 if type(state) is tuple else 0
            if (k not in (1, 2) or (k == 2 and type(state[0]) is not int) or not _int_tuple(state[k - 1])
                    or type(state[k + 1]) not in (bool, int) or type(state[k + 2]) not in (bytes, bytearray)):
                raise _Refused("refused an ndarray state other than numpy's (shape, dtype, order, bytes)")
            inst.__setstate__(state[:k] + (_plain_dtype(state[k]),) + state[k + 1:])
        else:
            raise _Refused(f"refused BUILD on {type(inst).__name__}")

    dispatch = {code: _count_opcode(load)
                for code, load in pickle._Unpickler.dispatch.items()}  # type: ignore[attr-defined]
    for _code, _load in (
        (pickle.PUT, _load_put), (pickle.BYTEARRAY8, _load_bytearray8), (pickle.SETITEM, _load_setitem),
        (pickle.SETITEMS, _load_setitems), (pickle.DICT, _load_dict), (pickle.BUILD, _load_build),
        (pickle.EMPTY_SET, _refuse), (pickle.ADDITEMS, _refuse), (pickle.FROZENSET, _refuse),
        (pickle.INST, _refuse), (pickle.OBJ, _refuse), (pickle.NEWOBJ, _refuse), (pickle.NEWOBJ_EX, _refuse),
    ):
        dispatch[_code[0]] = _count_opcode(_load)
    del _code, _load


def _numpy_internal(submodule: str, attr: str) -> Any:
    import importlib

    for mod in (f"numpy._core.{submodule}", f"numpy.core.{submodule}"):
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {submodule}.{attr}")


def _check_pickle_tree(obj: Any, path: Path, layout: str) -> None:
    """Walk an unpickled object before anything else touches it: at most :data:`MAX_PICKLE_DEPTH` levels
    of containers and :data:`MAX_PICKLE_ELEMENTS` elements, a shared container counted every time it is
    reached (``L1 = [L0, L0], L2 = [L1, L1], ...`` is a few bytes per level but 2**k elements)."""
    budget = MAX_PICKLE_ELEMENTS
    containers = (list, tuple, dict)
    todo = [(obj, 0)] if type(obj) in containers else []
    while todo:
        o, depth = todo.pop()
        if depth >= MAX_PICKLE_DEPTH:
            raise DataError(
                f"{path}: nested too deeply (containers more than {MAX_PICKLE_DEPTH} levels deep, "
                f"MAX_PICKLE_DEPTH); refused. Expected a CIFAR batch, a dict of flat lists and arrays: {layout}"
            )
        budget -= len(o)
        if budget < 0:
            raise DataError(
                f"{path}: too many shared references (more than {MAX_PICKLE_ELEMENTS} container elements, "
                f"a shared one counted each time it is reached, MAX_PICKLE_ELEMENTS); refused. Expected a "
                f"CIFAR batch, a dict of flat lists and arrays: {layout}"
            )
        for v in (o.values() if type(o) is dict else o):  # dict keys are bytes/str (checked on load)
            if type(v) in containers:
                todo.append((v, depth + 1))


def load_cifar_pickle(blob: bytes, path: Path, layout: str) -> Any:
    """Unpickle the bytes ``blob`` of the CIFAR file ``path`` within the opcode and tree budgets;
    anything refused or malformed raises :class:`DataError` naming ``path`` and ``layout``."""
    try:
        obj = _CifarUnpickler(io.BytesIO(blob)).load()
    except pickle.UnpicklingError as e:
        raise DataError(
            f"{path}: not a CIFAR python batch ({e}); refused without running it. Expected {layout}"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to decode an untrusted file is a data error
        raise DataError(
            f"{path}: truncated or malformed CIFAR python batch ({type(e).__name__}: {e}). "
            f"Expected {layout}"
        ) from None
    _check_pickle_tree(obj, path, layout)
    return obj
