"""Read the tensors of an untrusted torch ``.pth`` file (torch's zip format) without running any code it names.

``torch.load(weights_only=False)`` executes whatever the pickle names; ``weights_only=True`` refuses any file that
holds more than tensors and plain containers, for instance upstream NEURONS checkpoints, whose ``lr_scheduler`` entry
holds a pickled bound method (OneCycleLR's ``anneal_func`` under torch < 2.4, pickled as ``getattr(<scheduler>,
"anneal_func")``, which drags the scheduler and its optimizer along). :func:`open_untrusted` reads such a file with a
restricted unpickler:

* ``find_class`` resolves a small allowlist only: ``collections.OrderedDict``, torch's tensor / parameter rebuild
  functions (replaced by our own, which only record where a tensor lies), the storage types (read as their dtype) and
  dtypes. Every other global becomes an inert placeholder class: the global is never imported, "calling" the
  placeholder makes another placeholder, and any state given to it is discarded.
* ``persistent_load`` accepts storage references only, and returns a lazy record of one: no tensor data is read while
  unpickling, so the optimizer's moments in the same file are never loaded.
* :meth:`UntrustedCheckpoint.state_dict` then takes one entry (``model_state_dict``), checks that it maps names to
  tensors, and memory-maps (copy-on-write) their storages from the zip file, which torch writes uncompressed and
  aligned (``<archive>/data/<key>`` records). Tensors that shared a storage in the file share it here too.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from utils.errors import WeightsError

log = logging.getLogger(__name__)

# storage class name (module ``torch``) -> dtype; ``UntypedStorage`` holds raw bytes
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


class Inert:
    """Stands for a global outside the allowlist: the global itself is never imported nor called. Calling the
    placeholder (pickle's REDUCE / NEWOBJ / INST) makes another placeholder; state, items and appends are dropped."""

    origin: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {self.origin}>"


class _Frozen:
    """Lazy records refuse pickle's BUILD: nothing in the file may change them after they were made."""

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on a tensor record")


@dataclass(frozen=True, eq=False)
class LazyStorage(_Frozen):
    """One storage record of the archive (``data/<key>``): ``numel`` elements of ``dtype`` (None: unknown type)."""

    key: str
    dtype: torch.dtype | None
    numel: int
    type_name: str


@dataclass(frozen=True, eq=False)
class LazyTensor(_Frozen):
    """Where a tensor lies in a storage: ``as_strided(storage, size, stride, offset)``."""

    storage: LazyStorage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> Any:
    """Our stand-in for ``torch._utils._rebuild_tensor(_v2)``: records the layout, touches no data."""
    if not isinstance(storage, LazyStorage):
        return Inert()
    try:
        return LazyTensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))
    except (TypeError, ValueError):
        return Inert()


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    """Our stand-in for ``torch._utils._rebuild_parameter(_with_state)``: the parameter's tensor."""
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


@dataclass(frozen=True)
class _StorageKind:
    """What ``find_class`` gives for ``torch.<X>Storage``: its name and dtype."""

    name: str
    dtype: torch.dtype


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch zip archive's ``data.pkl`` with the allowlist above; ``replaced`` collects the globals that
    became placeholders (for the log)."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.replaced: collections.Counter[str] = collections.Counter()
        self._inert: dict[str, type[Inert]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return _StorageKind(name, STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        origin = f"{module}.{name}"
        self.replaced[origin] += 1
        if origin not in self._inert:
            self._inert[origin] = type(f"Inert[{origin}]", (Inert,), {"origin": origin})
        return self._inert[origin]

    def persistent_load(self, pid: Any) -> LazyStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and _ascii(pid[0]) == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {type(pid).__name__}")
        kind, key, _location, numel = pid[1:]
        if not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError("bad storage size")
        if isinstance(kind, _StorageKind):
            return LazyStorage(_ascii(key), kind.dtype, numel, kind.name)
        return LazyStorage(_ascii(key), None, numel, getattr(kind, "origin", type(kind).__name__))


def _ascii(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


@dataclass
class UntrustedCheckpoint:
    """A torch zip checkpoint unpickled by :class:`RestrictedUnpickler`: ``top`` holds lazy tensor records and inert
    placeholders; :meth:`state_dict` materialises one entry."""

    path: Path
    prefix: str  # the archive's folder inside the zip
    top: Any
    replaced: dict[str, int] = field(default_factory=dict)  # globals that became placeholders, with their counts

    def keys(self) -> list[str]:
        return [str(k) for k in self.top] if isinstance(self.top, Mapping) else []

    def scalar(self, key: str) -> int | float | str | None:
        """A plain int / float / str entry of the top-level dict (None when absent or anything else)."""
        value = self.top.get(key) if isinstance(self.top, Mapping) else None
        return value if isinstance(value, int | float | str) and not isinstance(value, bool) else None

    def state_dict(self, entry: str | None = "model_state_dict") -> dict[str, torch.Tensor]:
        """The tensors of ``top[entry]`` (``entry`` None: ``top`` itself), memory-mapped, in file order."""
        where = f"{self.path}" + (f" [{entry!r}]" if entry else "")
        table = self.top if entry is None else (self.top.get(entry) if isinstance(self.top, Mapping) else None)
        if not isinstance(table, Mapping):
            raise WeightsError(
                f"{where} is not a dict of tensors (found {_describe(table)}; top-level keys {self.keys()[:8]})",
                "pass the NEURONS checkpoint that holds a model_state_dict",
            )
        bad = [(k, v) for k, v in table.items() if not isinstance(k, str) or not isinstance(v, LazyTensor)]
        if bad:
            key, value = bad[0]
            raise WeightsError(f"{where} entry {key!r} is {_describe(value)}, not a tensor ({len(bad)} such entries)",
                               "pass a checkpoint whose model_state_dict holds tensors only")  # fmt: skip
        with _Archive(self.path, self.prefix) as archive:
            return {k: archive.tensor(v, k) for k, v in table.items()}


def _describe(value: Any) -> str:
    if isinstance(value, Inert):
        return f"an object of {value.origin} (not loaded)"
    return "nothing" if value is None else f"a {type(value).__name__}"


def open_untrusted(path: str | os.PathLike[str]) -> UntrustedCheckpoint:
    """Unpickle ``path`` (torch's zip format) without running anything it names and without reading tensor data."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} not found", "check the path")
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _archive_prefix(zf, path)
            data = zf.read(f"{prefix}/data.pkl")
            order = zf.read(f"{prefix}/byteorder").decode().strip() if f"{prefix}/byteorder" in zf.NameToInfo else ""
    except zipfile.BadZipFile:
        raise WeightsError(f"{path} is not a torch zip-format checkpoint (a legacy or corrupt file)",
                           "re-download it; files saved with torch >= 1.6 use the zip format") from None  # fmt: skip
    if order not in ("", sys.byteorder):
        raise WeightsError(f"{path} stores {order}-endian tensors", f"convert it on a {order}-endian machine first")
    unpickler = RestrictedUnpickler(data)
    try:
        top = unpickler.load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise WeightsError(f"{path} cannot be read safely ({type(err).__name__}: {str(err)[:80]})",
                           "re-download it, or check that it is a torch checkpoint") from None  # fmt: skip
    if unpickler.replaced:
        log.info("%s: %d globals not loaded (kept inert): %s", path.name, sum(unpickler.replaced.values()),
                 ", ".join(sorted(unpickler.replaced)))  # fmt: skip
    return UntrustedCheckpoint(path, prefix, top, dict(unpickler.replaced))


def load_state_dict(path: str | os.PathLike[str], entry: str | None = "model_state_dict") -> dict[str, torch.Tensor]:
    """``open_untrusted(path).state_dict(entry)``: the tensors of one entry, nothing else of the file."""
    return open_untrusted(path).state_dict(entry)


def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise WeightsError(f"{path} holds {len(pickles)} data.pkl records, not one", "pass a torch.save file")
    return pickles[0].split("/")[0]


class _Archive:
    """Storage records of the zip, memory-mapped copy-on-write; each is mapped once, so shared storages stay shared."""

    def __init__(self, path: Path, prefix: str):
        self.path, self.prefix = path, prefix
        self.storages: dict[str, torch.Tensor] = {}

    def __enter__(self) -> _Archive:
        self.zf = zipfile.ZipFile(self.path)
        self.fh = open(self.path, "rb")  # noqa: SIM115 - closed in __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()
        self.zf.close()

    def tensor(self, ref: LazyTensor, name: str) -> torch.Tensor:
        flat = self.storage(ref.storage, name)
        try:
            return torch.as_strided(flat, ref.size, ref.stride, ref.offset)
        except RuntimeError as err:
            raise WeightsError(f"{self.path}: tensor {name!r} lies outside its storage ({str(err)[:80]})",
                               "re-download the file; it is corrupt") from None  # fmt: skip

    def storage(self, ref: LazyStorage, name: str) -> torch.Tensor:
        """The flat (numel,) tensor of a storage record."""
        if ref.key in self.storages:
            return self.storages[ref.key]
        if ref.dtype is None:
            raise WeightsError(f"{self.path}: tensor {name!r} has an unsupported storage type {ref.type_name}",
                               "convert the file to a standard dtype")  # fmt: skip
        record = f"{self.prefix}/data/{ref.key}"
        if record not in self.zf.NameToInfo:
            raise WeightsError(f"{self.path}: tensor {name!r} names a missing record {record}", "re-download the file")
        info = self.zf.getinfo(record)
        nbytes = ref.numel * torch.empty(0, dtype=ref.dtype).element_size()
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != nbytes:
            raise WeightsError(f"{self.path}: record {record} holds {info.file_size} bytes (compression "
                               f"{info.compress_type}), expected {nbytes} stored", "re-download the file")  # fmt: skip
        flat = self._read(info, nbytes).view(ref.dtype) if nbytes else torch.empty(0, dtype=ref.dtype)
        self.storages[ref.key] = flat
        return flat

    def _read(self, info: zipfile.ZipInfo, nbytes: int) -> torch.Tensor:
        """(nbytes,) uint8 of a stored record: memory-mapped copy-on-write (the file is never written)."""
        self.fh.seek(info.header_offset)
        header = self.fh.read(_LOCAL_HEADER)
        if len(header) != _LOCAL_HEADER or header[:4] != b"PK\x03\x04":
            raise WeightsError(f"{self.path}: bad zip header for {info.filename}", "re-download the file")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + _LOCAL_HEADER + name_len + extra_len
        if start + nbytes > self.path.stat().st_size:
            raise WeightsError(f"{self.path} is truncated ({info.filename} ends past the file)", "re-download it")
        array = np.memmap(self.path, dtype=np.uint8, mode="c", offset=start, shape=(nbytes,))
        if start % 16:  # torch aligns records to 64 bytes; an unaligned one is copied so that any dtype view works
            return torch.from_numpy(np.array(array))
        return torch.from_numpy(array)
