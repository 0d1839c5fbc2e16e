"""Writing files safely: one atomic writer for everything psp-zoo writes, and folder checks.

A reader of a psp-zoo output (a results file, a README after ``tables --update``, a prediction
PNG, a downloaded checkpoint) sees the old file or the new one, never a part: data goes to a
temporary file in the target folder, is flushed to disk, and replaces the target in one
``os.replace``. The temporary file is created with ``os.open(..., 0o666)``, so the kernel applies
the process umask as for any new file; a replaced file keeps its own permissions. Nothing here
changes the process umask (which would race with other threads).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator, Union

from .errors import PspZooError

__all__ = ["atomic_write", "atomic_path", "atomic_save", "check_writable_folder", "PathLike"]

PathLike = Union[str, Path]


def _temporary_name(path: Path) -> Path:
    # hidden, and ending in the target's suffix: writers such as cv2.imwrite choose the format by
    # it and np.save would otherwise append ".npy"
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path`` atomically.

    For writers that want a file name (``PIL.Image.save``, ``np.save``): the temporary file
    already exists (created with the umask's permissions) when the writer opens it. On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _keep_mode_of(path, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _keep_mode_of(path: Path, tmp: Path) -> None:
    """A replaced file keeps its permissions (a README stays readable to all)."""
    try:
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    except FileNotFoundError:
        pass


def atomic_write(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; returns ``path``."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def atomic_save(path: PathLike, save: Callable[[Path], object]) -> Path:
    """``save(tmp)`` writes the file (``tmp`` is a str), which then replaces ``path`` atomically."""
    with atomic_path(path) as tmp:
        save(str(tmp))
    return Path(path)


def check_writable_folder(folder: PathLike, what: str = "output folder") -> Path:
    """Prove, before any long work starts, that ``folder`` can be created or written; creates nothing.

    Raises PspZooError naming the folder and the reason (a file in the way, no permission).
    """
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise PspZooError(f"{existing} is a file, not a folder; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PspZooError(f"the folder {existing} is not writable; choose another {what}")
    return folder
