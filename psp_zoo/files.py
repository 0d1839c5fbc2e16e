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

__all__ = ["atomic_write", "atomic_path", "check_writable_folder", "PathLike"]

PathLike = Union[str, Path]


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


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
    """``save(tmp)`` writes the file, which then replaces ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        save(tmp)
    return Path(path)


def check_writable_folder(folder: PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it takes a new file, before any long work starts.

    Raises PspZooError naming the folder and the reason (a file in the way, no permission).
    """
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _temporary_name(folder / "write-check")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except FileExistsError:
        raise PspZooError(f"cannot use {folder} as the {what}: a file of that name is in the way; "
                          f"choose another folder") from None
    except NotADirectoryError:
        raise PspZooError(f"cannot use {folder} as the {what}: part of the path is a file, not a "
                          f"folder; choose another folder") from None
    except OSError as exc:
        raise PspZooError(f"cannot write to the {what} {folder} ({exc.strerror or exc}); choose a "
                          f"writable folder") from None
    return folder
