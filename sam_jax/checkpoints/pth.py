"""Reads PyTorch `.pth` checkpoints without PyTorch, and without trusting them.

Ports the part of `torch.load(f, weights_only=True)` that a state dict needs. Since torch 1.6,
`torch.save` writes a zip archive: `<root>/data.pkl` is a pickle of the object tree in which
every tensor is a call to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
and every storage is a "persistent id" `("storage", <torch.XStorage>, key, device, numel)` whose
bytes are the archive member `<root>/data/<key>`.

Unpickling runs whatever callables the pickle names, so an untrusted checkpoint is code. The
unpickler here resolves only an allow-list of names (tensor rebuilders, storage types, dtypes,
OrderedDict) to harmless stand-ins written here; any other name is refused before anything is
called. Tensors come back as numpy arrays of the stored dtype (bfloat16 via `ml_dtypes`).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Dict, Tuple

import ml_dtypes
import numpy as np

from .errors import CheckpointError


# torch storage class name -> numpy dtype. Keys are the names torch.save writes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}

# torch dtype name -> numpy dtype (dtypes may appear as pickled globals, e.g. in metadata).
_TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32,
    "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class _StorageType:
    """Stand-in for a `torch.XStorage` class: only records its name."""

    def __init__(self, name: str):
        self.name = name


class _Storage:
    """A storage read from the archive: a flat numpy array of `numel` elements."""

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
    """numpy version of `torch._utils._rebuild_tensor_v2`: the storage itself when the tensor
    covers all of it contiguously (no copy), else a contiguous copy of the strided view."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(storage_offset)
    flat = storage.array
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise CheckpointError(f"malformed tensor: offset {offset}, size {size}, stride {stride}")
    # as_strided reads raw memory, so the last element must lie inside the storage: a hostile
    # file could otherwise read past the buffer.
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise CheckpointError(
                f"tensor view (offset {offset}, size {size}, stride {stride}) reaches element "
                f"{last} of a storage of {flat.size}")
        if offset == 0 and flat.size == np.prod(size) and stride == _contiguous_strides(size):
            return flat.reshape(size)  # the usual case: the tensor is its whole storage
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride],
            writeable=False)
        return np.array(view)  # contiguous copy, independent of the storage
    return np.zeros(size, flat.dtype)


def _contiguous_strides(size):
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    """`torch._utils._rebuild_parameter(_with_state)`: a Parameter is just its data here."""
    if not isinstance(data, np.ndarray):
        raise CheckpointError(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, byteorder: str, path: str):
        super().__init__(file)
        self._archive, self._root, self._byteorder, self._path = archive, root, byteorder, path
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return np.dtype(_TORCH_DTYPES[name])
        raise CheckpointError(
            f"refusing to load {self._path}: it references {module}.{name}, which is not a "
            "tensor, storage or container (a checkpoint holding it could run code)")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"refusing to load {self._path}: unexpected persistent id "
                                  f"{pid!r:.200}")
        _, storage_type, key, _device, numel = pid
        key = str(key)
        if key not in self._storages:
            # dtype by name from our table, whatever the pickle may have set on the stand-in
            dtype = np.dtype(_STORAGE_DTYPES[storage_type.name])
            self._storages[key] = self._read_storage(key, dtype, int(numel))
        return self._storages[key]

    def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
        name = f"{self._root}/data/{key}"
        try:
            member = self._archive.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self._path}: storage {name} is missing from the archive")
        if numel < 0 or member.file_size < numel * dtype.itemsize:
            raise CheckpointError(f"{self._path}: storage {name} has {member.file_size} bytes, "
                                  f"expected {numel} x {dtype.itemsize}")
        order = "<" if self._byteorder == "little" else ">"
        array = np.empty(numel, dtype.newbyteorder(order))
        with self._archive.open(member) as f:  # read straight into the array: one copy
            if f.readinto(array.view(np.uint8)) != array.nbytes:
                raise CheckpointError(f"{self._path}: storage {name} is truncated")
        return _Storage(array.astype(dtype, copy=False))  # native byte order


def _archive_root(archive: zipfile.ZipFile, path: str) -> str:
    """The archive's top folder (torch names it after the file; any name is fine)."""
    roots = {n.rsplit("/", 1)[0] for n in archive.namelist() if n.endswith("/data.pkl")}
    roots = {r for r in roots if "/" not in r}
    if len(roots) != 1:
        raise CheckpointError(f"{path}: a torch zip checkpoint has exactly one <root>/data.pkl; "
                              f"found {sorted(roots) or 'none'}")
    return roots.pop()


def load_pth(path: str | os.PathLike) -> Any:
    """The object a `.pth` file holds (usually a dict of str -> numpy array).

    Raises CheckpointError for non-zip (legacy, pre-1.6) files, corrupt archives and any
    pickled name outside the tensor allow-list.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: legacy (pre-1.6, non-zip) torch checkpoint; re-save it with a recent "
                "torch (`torch.save(torch.load(f, weights_only=True), g)`)")
        raise CheckpointError(f"{path}: not a torch checkpoint (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            root = _archive_root(archive, path)
            byteorder = "little"
            if f"{root}/byteorder" in archive.namelist():
                byteorder = archive.read(f"{root}/byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder {byteorder!r}")
            data = archive.read(f"{root}/data.pkl")
            return _RestrictedUnpickler(io.BytesIO(data), archive, root, byteorder, path).load()
    except CheckpointError as e:
        if path in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt torch checkpoint ({type(e).__name__}: {e})")


def tensor_items(obj: Any, path: str) -> Tuple[Tuple[str, np.ndarray], ...]:
    """Checks that `obj` is a flat str -> array mapping and returns its items."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise CheckpointError(f"{path}: entries that are not str -> tensor: {bad[:20]}")
    return tuple(obj.items())
