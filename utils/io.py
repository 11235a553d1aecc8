"""Atomic file writes and file fingerprints.

Every file the pipeline produces is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written output behind and a reader never sees one. A write that fails because of the storage (disk
full, quota, read-only, permission) removes its temporary file and raises a one-line
:class:`~utils.errors.StorageError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.errors import NeuronsError, StorageError

STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}
# safetensors (SafetensorError) and torch.save (RuntimeError) report a failed write in their message only
_STORAGE_TEXT = (
    ("os error 28", errno.ENOSPC),
    ("no space left", errno.ENOSPC),
    ("os error 122", errno.EDQUOT),
    ("quota exceeded", errno.EDQUOT),
    ("os error 27", errno.EFBIG),
    ("file too large", errno.EFBIG),
    ("os error 30", errno.EROFS),
    ("read-only file system", errno.EROFS),
)
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos")


def storage_error(err: BaseException, path: str | os.PathLike | None = None) -> StorageError | None:
    """The :class:`StorageError` for a write (of ``path``) that failed because of the storage, else None."""
    code = err.errno if isinstance(err, OSError) else None
    text = str(err).lower()
    if code not in STORAGE_ERRNOS:
        code = next((c for key, c in _STORAGE_TEXT if key in text), None)
    if code is None and not (isinstance(err, RuntimeError) and any(k in text for k in _TORCH_WRITE_FAILED)):
        return None
    target = f"cannot write {path}" if path is not None else "a write failed"
    folder = Path(path).parent if path is not None else Path.cwd()
    detail = re.sub(r"\[enforce fail at [^\]]*\][\s.]*", "", str(err).strip().splitlines()[0])[:80]
    what = STORAGE_ERRNOS[code] if code is not None else f"the write failed ({type(err).__name__}: {detail})"
    try:
        free = f", {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    if code in (errno.EROFS, errno.EACCES):
        fix = f"make {folder} writable, or set paths.exp_root to a writable folder"
    else:
        fix = (f"free space under {folder} (or set paths.exp_root to a larger disk) and rerun the stage; "
               "stages 1 and 2 continue with --resume")  # fmt: skip
    return StorageError(f"{target}: {what}{free}; nothing partial was left", fix)


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn a storage failure inside the block into a one-line :class:`StorageError`; other errors pass."""
    try:
        yield
    except NeuronsError:
        raise
    except Exception as err:
        problem = storage_error(err, path)
        if problem is None:
            raise
        raise problem from err


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file the usual permissions
        try:
            yield tmp_path
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_none(obj: Any) -> Any:
    """Non-finite floats → None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` atomically and byte-deterministically.

    torch names the zip archive inside the file after the file's stem, so saving under a random temporary name would
    make identical content differ in bytes; we save under the final name in a temporary sibling folder instead.
    """
    import torch

    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tmp = tmp_dir / path.name
            torch.save(obj, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def file_fingerprint(path: str | os.PathLike, with_hash: bool = False) -> dict[str, Any]:
    """Identity of a file as recorded in manifests: size and mtime (ns), optionally its sha256."""
    st = Path(path).stat()
    fp: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_hash:
        fp["sha256"] = sha256_file(path)
    return fp


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
