"""Unpickle FLAME-format files safely: no arbitrary code, bounded memory.

A pickle is a program: :class:`RestrictedUnpickler` builds only what FLAME's files contain —
numpy arrays and dtypes, scipy.sparse matrices, a stand-in for chumpy's ``Ch`` (whose state
holds the array in ``x``), and torch tensors (whose storages are read by
``torch.load(weights_only=True)``) — and refuses every other global with
:class:`UnsafePickleError` naming it, before anything is called.

It is also a program that can ask for memory its file does not hold. Every place where the
allow-list would allocate from a *declared* size (a numpy array's shape at
``_reconstruct``, a torch storage's element count, a tensor view's size, a sparse matrix's
dense shape) is charged to a budget proportional to the file's length, *before* anything is
allocated; conversion keeps the objects that the pickle shares through its memo shared
(a 220-byte pickle of lists that each hold the previous one twice otherwise expands to
2^depth lists) and refuses nesting deeper than :data:`MAX_DEPTH` and self-references.
Real data is stored in the file itself, so honest files stay far below the budget.
"""
from __future__ import annotations

import _compat_pickle
import functools
import io
import pickle
import pickletools
import zipfile
from typing import Any

import numpy as np

from recon.face_model.face_assets import FaceModelFormatError

#: Bytes an unpickled file may allocate from declared sizes: this many times its length...
ALLOC_PER_FILE_BYTE = 4
#: ... but at least this much (small files with a few empty arrays and dtypes).
ALLOC_FLOOR = 16 << 20
#: Containers nested deeper than this are refused (FLAME files nest 3-4 levels).
MAX_DEPTH = 64


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list (named in the message)."""


class PickleLimitError(UnsafePickleError):
    """The pickle declares more memory, nesting or sharing than its bytes can hold."""


class _Budget:
    """Bytes that declared sizes may still allocate for one file."""

    def __init__(self, n_file_bytes: int):
        self.file_bytes = n_file_bytes
        self.limit = max(ALLOC_PER_FILE_BYTE * n_file_bytes, ALLOC_FLOOR)
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        self.used += max(int(nbytes), 0)
        if self.used > self.limit:
            raise PickleLimitError(
                f"refusing pickle: {what} declares {int(nbytes):,} bytes; a {self.file_bytes:,}-byte "
                f"file may allocate at most {self.limit:,} (memory bomb?)")


def _nbytes(shape: Any, itemsize: int, what: str) -> int:
    try:
        dims = [int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,))]
    except (TypeError, ValueError) as e:
        raise FaceModelFormatError(f"{what}: shape {shape!r} is not a tuple of ints") from e
    if any(d < 0 for d in dims):
        raise FaceModelFormatError(f"{what}: negative size in shape {tuple(dims)}")
    n = int(itemsize)
    for d in dims:  # python ints: no overflow on a shape like (2**40, 2**40)
        n *= d
    return n


# ----------------------------------------------------------------------------- stand-ins
class _StateHolder:
    """Base of the stand-ins: records the pickled state instead of running any code."""

    pickled_module = ""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __reduce__(self):  # never re-pickle a stand-in as if it were the real class
        raise TypeError(f"stand-in for {self.pickled_module} cannot be pickled")


class ChumpyArray(_StateHolder):
    """Stand-in for ``chumpy.ch.Ch`` and the chumpy classes FLAME pickles use."""

    def to_numpy(self, convert=None) -> np.ndarray:
        convert = convert or _Converter(None).convert
        state = self.state if isinstance(self.state, dict) else {}
        if "x" in state:
            return np.asarray(convert(state["x"]))
        if "a" in state:  # chumpy.reordering nodes (e.g. Select/Reshape) wrap an operand
            return convert(state["a"])
        raise FaceModelFormatError(f"unsupported chumpy object {self.pickled_module} (state keys {sorted(state)})")


class SparseMatrix(_StateHolder):
    """Stand-in for scipy.sparse csc/csr/coo matrices; converted with scipy afterwards."""

    def to_scipy(self, budget: _Budget | None = None):
        import scipy.sparse as sp

        st = self.state if isinstance(self.state, dict) else {}
        shape = tuple(int(s) for s in st.get("_shape", st.get("shape", ())))
        if budget is not None:  # loaders densify FLAME's sparse J_regressor
            budget.charge(_nbytes(shape, 8, "sparse matrix"), f"sparse matrix of shape {shape}")
        fmt = self.pickled_module.rsplit(".", 1)[-1][:3]
        if fmt in ("csc", "csr"):
            cls = sp.csc_matrix if fmt == "csc" else sp.csr_matrix
            return cls((np.asarray(st["data"]), np.asarray(st["indices"]), np.asarray(st["indptr"])), shape=shape)
        if fmt == "coo":
            row = st.get("row", st.get("coords", (None, None))[0])
            col = st.get("col", st.get("coords", (None, None))[1])
            return sp.coo_matrix((np.asarray(st["data"]), (np.asarray(row), np.asarray(col))), shape=shape)
        raise FaceModelFormatError(f"unsupported sparse matrix {self.pickled_module}")


def _stand_in(base: type, qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (base,), {"pickled_module": qualname})


class _Token:
    """A global that pickles pass as an argument only (``numpy.ndarray``, ``torch.Tensor``):
    not callable, so a pickle cannot call it with a size of its choosing."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(f"refusing to call {self.name}: pickles may only pass it to a rebuild")


_NDARRAY = _Token("numpy.ndarray")
_TENSOR_TYPES = {"torch Tensor": _Token("torch.Tensor"),
                 "torch.nn.parameter Parameter": _Token("torch.nn.Parameter"),
                 "torch.nn Parameter": _Token("torch.nn.Parameter")}


def _reconstructor(budget: _Budget, cls: type, base: type, state: Any):
    """Safe ``copyreg._reconstructor``: only for allow-listed classes on ``object``."""
    if base is not object or not (isinstance(cls, type) and issubclass(cls, _StateHolder)):
        raise UnsafePickleError(f"copyreg._reconstructor of {cls!r} is not allowed")
    return cls()


class _StorageScan(pickle.Unpickler):
    """Reads the pickles of torch's legacy storage format for their declared sizes only."""

    def __init__(self, fh):
        super().__init__(fh)
        self.nbytes = 0

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return name
        raise UnsafePickleError(f"refusing to unpickle {module}.{name} in a torch storage")

    def persistent_load(self, pid: Any) -> Any:
        import torch

        from torch.serialization import StorageType

        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage")):
            raise UnsafePickleError(f"refusing persistent id {pid!r} in a torch storage")
        storage_type, numel = pid[1], pid[4]
        try:
            itemsize = torch._utils._element_size(StorageType(storage_type).dtype)
        except (KeyError, TypeError, AttributeError) as e:
            raise UnsafePickleError(f"unknown torch storage type {storage_type!r}") from e
        self.nbytes += _nbytes((numel,), itemsize, "torch storage")
        return None


def _declared_storage_bytes(data: bytes) -> int:
    """Bytes the storages of a torch file would take (zip or legacy format): the zip's member
    sizes, or the legacy pickle's storage records read by the restricted :class:`_StorageScan`
    (nothing else is unpickled)."""
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
        if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
            raise PickleLimitError("refusing a compressed torch storage archive (torch writes them stored)")
        return sum(i.file_size for i in infos)
    fh = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        _check_declared_lengths(fh)
        _StorageScan(fh).load()
    _check_declared_lengths(fh)
    scan = _StorageScan(fh)
    scan.load()
    return scan.nbytes


def _load_torch_storage(budget: _Budget, data: bytes):
    import torch

    declared = _declared_storage_bytes(data)
    if declared > len(data):  # an honest storage carries its bytes
        raise PickleLimitError(f"refusing pickle: a torch storage declares {declared:,} bytes "
                               f"but holds {len(data):,} (memory bomb?)")
    budget.charge(declared, "a torch storage")
    return torch.load(io.BytesIO(data), weights_only=True)


def _rebuild_tensor(budget: _Budget, storage, storage_offset, size, stride, *rest):
    """``torch._utils._rebuild_tensor_v2`` without its hooks/metadata arguments."""
    import torch

    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError("tensor rebuild without a torch storage")
    # A view with zero strides costs nothing here but is densified by every consumer.
    budget.charge(_nbytes(tuple(size), torch._utils._element_size(storage.dtype), "tensor"), f"a tensor of size {tuple(size)}")
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_from_type_v2(budget: _Budget, func, new_type, args, state):
    if getattr(func, "func", None) is not _rebuild_tensor or new_type not in _TENSOR_TYPES.values():
        raise UnsafePickleError("unexpected torch tensor rebuild")
    return func(*args)


def _rebuild_parameter(budget: _Budget, data, requires_grad, backward_hooks, *rest):
    return data


_CHUMPY_CLASSES = {
    "chumpy.ch Ch", "chumpy.ch_ops add", "chumpy.ch_ops subtract", "chumpy.ch_ops multiply",
    "chumpy.reordering Select", "chumpy.reordering transpose", "chumpy.reordering Reshape",
}
_SPARSE_CLASSES = {
    f"{mod} {fmt}_matrix"
    for fmt in ("csc", "csr", "coo")
    for mod in ("scipy.sparse", f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}")
} | {f"scipy.sparse._{fmt} {fmt}_array" for fmt in ("csc", "csr", "coo")}


def _codecs_encode(budget: _Budget, text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes for protocol 2, limited to the two codecs
    it uses (no codec lookup by an attacker-chosen name)."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "utf8"):
        raise UnsafePickleError(f"codec {encoding!r} is not allowed")
    return text.encode(encoding)


def _numpy_reconstruct(budget: _Budget, subtype, shape, dtype):
    if subtype is not _NDARRAY:
        raise UnsafePickleError(f"numpy _reconstruct of {subtype!r} is not allowed")
    dtype = np.dtype(dtype)
    # numpy pickles an empty (0,) array here and fills it from the file's bytes afterwards.
    budget.charge(_nbytes(shape, dtype.itemsize, "numpy array"), f"a numpy array of shape {shape}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(budget: _Budget, dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy scalar of an object dtype is not allowed")
    if isinstance(data, str):
        data = data.encode("latin1")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _allowed() -> dict[str, Any]:
    """``"module name"`` -> global; functions take the file's :class:`_Budget` first."""
    import collections

    table: dict[str, Any] = {
        "copyreg _reconstructor": _reconstructor,
        "builtins object": object,
        "builtins set": set,
        "builtins frozenset": frozenset,
        "builtins slice": slice,
        "collections OrderedDict": collections.OrderedDict,
        "_codecs encode": _codecs_encode,
        "torch._utils _rebuild_tensor_v2": _rebuild_tensor,
        "torch._utils _rebuild_tensor": _rebuild_tensor,
        "torch._utils _rebuild_parameter": _rebuild_parameter,
        "torch._tensor _rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.storage _load_from_bytes": _load_torch_storage,
        "numpy ndarray": _NDARRAY,
        "numpy dtype": np.dtype,
        **_TENSOR_TYPES,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[f"{mod} _reconstruct"] = _numpy_reconstruct
        table[f"{mod} scalar"] = _numpy_scalar
    for q in _CHUMPY_CLASSES:
        table[q] = _stand_in(ChumpyArray, q.replace(" ", "."))
    for q in _SPARSE_CLASSES:
        table[q] = _stand_in(SparseMatrix, q.replace(" ", "."))
    return table


_ALLOWED = _allowed()
_BUDGETED = {_reconstructor, _codecs_encode, _rebuild_tensor, _rebuild_parameter,
             _rebuild_from_type_v2, _load_torch_storage, _numpy_reconstruct, _numpy_scalar}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only returns allow-listed, side-effect-free callables,
    each charging what it allocates to ``budget`` (by default sized from ``n_bytes``)."""

    def __init__(self, file, *, n_bytes: int, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.budget = _Budget(n_bytes)

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (copy_reg, __builtin__), as the stock find_class maps them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = f"{module} {name}"
        if key not in _ALLOWED:
            raise UnsafePickleError(f"refusing to unpickle {module}.{name}: not a class the safe "
                                   "loader allows (arrays, tensors, plain containers)")
        value = _ALLOWED[key]
        return functools.partial(value, self.budget) if value in _BUDGETED else value

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r}")


def _check_declared_lengths(fh: io.BytesIO) -> None:
    """Python's unpickler allocates a counted string's declared length before reading it (a
    21-byte file can ask for 1 TB); pickletools reads only what is there, so a walk over
    the opcodes of the pickle at ``fh``'s position finds a length that runs past the end
    first. ``fh`` is left where it was."""
    start = fh.tell()
    try:
        for _ in pickletools.genops(fh):
            pass
    except ValueError as e:
        if "remain" in str(e):
            raise PickleLimitError(f"refusing pickle: an opcode declares more bytes than the file "
                                   f"holds ({e})") from None
        raise FaceModelFormatError(f"corrupt or unexpected pickle ({e})") from e
    finally:
        fh.seek(start)


def safe_loads(data: bytes, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` with the allow-list and the memory budget; returns plain python /
    numpy objects. Raises :class:`UnsafePickleError` (:class:`PickleLimitError` for a
    memory bomb) or :class:`FaceModelFormatError` for a corrupt pickle."""
    fh = io.BytesIO(data)
    _check_declared_lengths(fh)
    unpickler = RestrictedUnpickler(fh, n_bytes=len(data), encoding=encoding)
    try:
        obj = unpickler.load()
        return _Converter(unpickler.budget).convert(obj)
    except UnsafePickleError:
        raise
    except RecursionError as e:
        raise PickleLimitError(f"refusing pickle: nested deeper than this loader follows ({e})") from None
    except MemoryError as e:  # a bomb the budget does not model: still one clear error
        raise PickleLimitError(f"refusing pickle: out of memory while loading a {len(data):,}-byte file") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            OverflowError) as e:
        raise FaceModelFormatError(f"corrupt or unexpected pickle ({type(e).__name__}: {e})") from e


class _Converter:
    """Stand-ins and torch tensors -> numpy arrays / scipy matrices, recursively. An object
    the pickle shares (memo) is converted once and stays shared; depth is bounded."""

    def __init__(self, budget: _Budget | None):
        self.budget = budget
        self.done: dict[int, Any] = {}
        self.expanded: dict[int, int] = {}  # id -> objects in the tree a consumer would walk
        self.active: set[int] = set()
        self.depth = 0
        self.walked = 0

    def convert(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, np.generic)):
            return obj
        key = id(obj)  # the input graph is alive throughout, so ids are not reused
        if key in self.done:
            self._count(self.expanded[key])
            return self.done[key]
        if key in self.active:
            raise PickleLimitError("refusing pickle: a container holds itself (self-reference)")
        if self.depth >= MAX_DEPTH:
            raise PickleLimitError(f"refusing pickle: containers nested deeper than {MAX_DEPTH} levels")
        self.active.add(key)
        self.depth += 1
        start = self.walked
        try:
            out = self._convert(obj)
        finally:
            self.depth -= 1
            self.active.discard(key)
        self._count(1)
        self.done[key], self.expanded[key] = out, self.walked - start
        return out

    def _count(self, n: int) -> None:
        """Shared objects stay shared here, but ``np.asarray`` or a loop over the result
        walks them as a tree: refuse a pickle whose tree outgrows its memory budget."""
        self.walked += n
        if self.budget is not None and 8 * self.walked > self.budget.limit:
            raise PickleLimitError(
                f"refusing pickle: its shared references (memo) expand to over {self.walked:,} "
                f"objects from a {self.budget.file_bytes:,}-byte file (memory bomb?)")

    def _convert(self, obj: Any) -> Any:
        if isinstance(obj, ChumpyArray):
            return obj.to_numpy(self.convert)
        if isinstance(obj, SparseMatrix):
            return obj.to_scipy(self.budget)
        if isinstance(obj, dict):
            return {(k.decode("latin1") if isinstance(k, bytes) else k): self.convert(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.convert(v) for v in obj)
        if isinstance(obj, np.ndarray) and obj.dtype == object:
            if obj.ndim == 0:
                return self.convert(obj.item())
            out = np.empty(obj.size, dtype=object)  # element-wise: np.array(list) would stack arrays
            for i, v in enumerate(obj.ravel()):
                out[i] = self.convert(v)
            return out.reshape(obj.shape)
        if type(obj).__module__.startswith("torch"):
            return obj.detach().cpu().numpy()
        return obj


def to_numpy(obj: Any) -> Any:
    """Replace stand-ins and torch tensors by numpy arrays / scipy matrices, recursively
    (shared objects stay shared; no memory budget: for objects already in memory)."""
    return _Converter(None).convert(obj)
