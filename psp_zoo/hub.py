"""Fetching checkpoint files into a local cache: resume, hash check, locking, mirrors, offline.

Knows no models, only manifest records and URLs. A file lives in the cache under its published
hashed name (``<stem>-<sha256[:8]>.pth``), in ``$PSP_ZOO_HOME`` or else torch.hub's checkpoint
directory, so a copy fetched earlier by torch.hub or mmseg is found and reused once its hash checks
out. Housekeeping (``.part`` files, locks, "already verified" markers) lives in ``.psp-zoo/`` there.

Nothing half-written ever sits under the final name: bytes go to ``.part`` (resumed with an HTTP
Range request after a dropped connection), are hashed while they stream, and only a file whose
SHA-256 matches is moved into place with ``os.replace``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import filelock
import requests
import torch
from tqdm import tqdm

from .errors import DownloadError
from .manifest import Checkpoint, get_checkpoint

__all__ = ["download", "fetch_file", "cache_dir", "cached_path", "cache_state", "is_cached", "resolve_url"]

log = logging.getLogger(__name__)

HOME_ENV = "PSP_ZOO_HOME"
MIRROR_ENV = "PSP_ZOO_MIRROR"
OFFLINE_ENV = "PSP_ZOO_OFFLINE"
OPENMMLAB_PREFIX = "https://download.openmmlab.com/"
HOUSEKEEPING = ".psp-zoo"

DEFAULT_RETRIES = 5        # attempts after the first, on connection errors, timeouts and 5xx
DEFAULT_BACKOFF_S = 1.0    # first wait; doubled after each failed attempt (tests set it near 0)
DEFAULT_TIMEOUT_S = 30.0   # connect and per-read timeout, not a limit on the whole transfer
CHUNK_BYTES = 1 << 20      # for hashing local files
# Network reads: when a connection drops, the block being read is lost, so keep blocks small.
STREAM_BYTES = 1 << 16

_HASHED_NAME_RE = re.compile(r"-(?P<prefix>[0-9a-f]{8})\.[A-Za-z0-9]+$")
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_NOT_THERE_STATUS = {401, 403, 404, 410}

NameOrUrl = Union[str, Checkpoint]
CacheDir = Union[None, str, Path]
ManifestPaths = Union[None, str, Path, Sequence[Union[str, Path]]]  # as psp_zoo.get_manifest takes


@dataclass(frozen=True)
class _Target:
    """One file to fetch: where from, under which name, and the hash it must have."""

    url: str
    filename: str
    hash_prefix: str
    sha256: Optional[str]
    label: str  # what the user asked for, for messages

    def accepts(self, digest: str) -> bool:
        return digest.startswith(self.hash_prefix) and (self.sha256 is None or digest == self.sha256)

    @property
    def expected(self) -> str:
        return self.sha256 or f"{self.hash_prefix}..."


class _Retryable(Exception):
    """A failure worth another attempt: connection lost, timeout, 5xx."""


# --------------------------------------------------------------------------------------------
# where things are


def cache_dir(path: CacheDir = None) -> Path:
    """The checkpoint cache: ``path``, else ``$PSP_ZOO_HOME``, else ``torch.hub.get_dir()/checkpoints``."""
    return _cache_root(path)


def _cache_root(path: CacheDir) -> Path:
    # torch.hub and mmseg (via mmengine) save published files here under the same hashed names
    if path is None:
        path = os.environ.get(HOME_ENV) or Path(torch.hub.get_dir()) / "checkpoints"
    return Path(path).expanduser()


def resolve_url(url: str, mirror: Optional[str] = None) -> str:
    """``url`` with the OpenMMLab download host replaced by ``mirror`` (or ``$PSP_ZOO_MIRROR``)."""
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV)
    if mirror and url.startswith(OPENMMLAB_PREFIX):
        return mirror.rstrip("/") + "/" + url[len(OPENMMLAB_PREFIX):]
    return url


def _target(name_or_url: NameOrUrl, manifest: ManifestPaths = None, sha256: Optional[str] = None) -> _Target:
    if isinstance(name_or_url, Checkpoint):
        entry = name_or_url
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", name_or_url):
        filename = unquote(urlparse(name_or_url).path.rsplit("/", 1)[-1])
        match = _HASHED_NAME_RE.search(filename)
        if not match and not sha256:
            raise DownloadError(f"cannot verify {name_or_url}: its file name does not end in "
                                f"-<8 hex digits of SHA-256>.pth; pass sha256=<full hash> to download it")
        prefix = match.group("prefix") if match else sha256[:8]
        return _Target(name_or_url, filename, prefix, sha256, label=name_or_url)
    else:
        entry = get_checkpoint(name_or_url, manifest=manifest)
    return _Target(entry.url, entry.filename, entry.hash_prefix, sha256 or entry.sha256, label=entry.name)


def cached_path(name_or_url: NameOrUrl, *, cache_dir: CacheDir = None, manifest: ManifestPaths = None) -> Path:
    """Where the verified file of a checkpoint name, manifest record or URL lives (or would live)."""
    return _cache_root(cache_dir) / _target(name_or_url, manifest).filename


def _housekeeping(final: Path, suffix: str) -> Path:
    return final.parent / HOUSEKEEPING / (final.name + suffix)


# --------------------------------------------------------------------------------------------
# verifying what is on disk, once


def _sha256_of(path: Path, digest=None):
    digest = digest or hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest


def _marker_matches(final: Path, target: _Target) -> bool:
    """True if ``final`` was hashed before and has not changed since (same size and mtime)."""
    try:
        stat = final.stat()
        mark = json.loads(_housekeeping(final, ".verified").read_text())
    except (OSError, ValueError):
        return False
    return (mark.get("size"), mark.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns) \
        and target.accepts(str(mark.get("sha256")))


def _remember_verified(final: Path, digest: str) -> None:
    marker = _housekeeping(final, ".verified")
    try:
        stat = final.stat()
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}))
        os.replace(tmp, marker)
    except OSError:  # a read-only shared cache: we just hash again next time
        pass


def _is_verified(final: Path, target: _Target) -> bool:
    """True if the file is present with the right hash (hashing it only when not remembered)."""
    if not final.is_file():
        return False
    if _marker_matches(final, target):
        return True
    digest = _sha256_of(final).hexdigest()
    if not target.accepts(digest):
        return False
    _remember_verified(final, digest)
    return True


def cache_state(name_or_url: NameOrUrl, *, cache_dir: CacheDir = None, manifest: ManifestPaths = None) -> str:
    """'cached' (verified), 'corrupt' (wrong hash), 'partial' (an interrupted download) or 'missing'."""
    target = _target(name_or_url, manifest)
    final = _cache_root(cache_dir) / target.filename
    if final.is_file():
        return "cached" if _is_verified(final, target) else "corrupt"
    return "partial" if _housekeeping(final, ".part").is_file() else "missing"


def is_cached(name_or_url: NameOrUrl, *, cache_dir: CacheDir = None, manifest: ManifestPaths = None) -> bool:
    """True if the checkpoint's file is in the cache with the right hash."""
    return cache_state(name_or_url, cache_dir=cache_dir, manifest=manifest) == "cached"


# --------------------------------------------------------------------------------------------
# fetching


def download(name_or_url: NameOrUrl, *, cache_dir: CacheDir = None, mirror: Optional[str] = None,
             offline: Optional[bool] = None, quiet: Optional[bool] = None, manifest: ManifestPaths = None,
             sha256: Optional[str] = None, retries: Optional[int] = None, backoff: Optional[float] = None,
             timeout: Optional[float] = None) -> Path:
    """The verified local path of a checkpoint (name, alias, manifest record or URL), fetching it if needed.

    ``mirror`` (default ``$PSP_ZOO_MIRROR``) replaces ``https://download.openmmlab.com/``;
    ``offline`` (default ``$PSP_ZOO_OFFLINE``) never touches the network; ``quiet`` hides the
    progress bar, which is only shown on a terminal anyway. Raises DownloadError on failure.
    """
    target = _target(name_or_url, manifest, sha256)
    final = _cache_root(cache_dir) / target.filename
    if final.is_file() and _marker_matches(final, target):
        return final  # the common case: no lock, no hashing
    offline = _env_flag(OFFLINE_ENV) if offline is None else offline
    if offline:
        return _from_cache_only(final, target)
    _make_dirs(final)
    with _locked(final):
        if _is_verified(final, target):
            return final  # present already, or fetched by another process while we waited
        url = resolve_url(target.url, mirror)
        log.info("downloading %s to %s", url, final)
        try:
            _fetch_verified(url, final, target, _Policy.make(retries, backoff, timeout, quiet))
        except OSError as exc:  # writing the cache failed: a full disk, a quota; the .part stays to resume
            raise DownloadError(f"cannot write {exc.filename or final}: {exc.strerror or exc}; free some space "
                                f"and run again to resume, or set {HOME_ENV} to another folder") from None
    return final


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _from_cache_only(final: Path, target: _Target) -> Path:
    if _is_verified(final, target):
        return final
    if final.is_file():
        raise DownloadError(f"offline: the cached {final} has the wrong SHA-256 (expected {target.expected}); "
                            f"delete it and run `psp-zoo get {target.label}` while online")
    raise DownloadError(f"offline: {target.filename} is not in the cache (looked for {final}); run "
                        f"`psp-zoo get {target.label}` while online, copy the file there, or set {HOME_ENV}")


def _make_dirs(final: Path) -> None:
    try:
        _housekeeping(final, "").parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot write to the cache {final.parent} ({exc.strerror or exc}); "
                            f"set {HOME_ENV} to a writable folder") from None


class _locked:
    """A per-file inter-process lock; says so when another process holds it, then waits."""

    def __init__(self, final: Path):
        self.final, self.lock = final, filelock.FileLock(str(_housekeeping(final, ".lock")))

    def __enter__(self):
        try:
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            log.info("waiting for another process downloading %s", self.final.name)
            self.lock.acquire()
        return self

    def __exit__(self, *exc_info):
        self.lock.release()


@dataclass(frozen=True)
class _Policy:
    retries: int
    backoff: float
    timeout: float
    quiet: bool

    @classmethod
    def make(cls, retries, backoff, timeout, quiet) -> "_Policy":
        return cls(DEFAULT_RETRIES if retries is None else retries,
                   DEFAULT_BACKOFF_S if backoff is None else backoff,
                   DEFAULT_TIMEOUT_S if timeout is None else timeout,
                   bool(quiet) or not sys.stderr.isatty())


def _fetch_verified(url: str, final: Path, target: _Target, policy: _Policy) -> None:
    """Fill ``.part`` (resuming what is there), check its hash, move it into place."""
    part = _housekeeping(final, ".part")
    resumed = part.is_file() and part.stat().st_size > 0
    digest = _fetch_with_retries(url, part, policy)
    if not target.accepts(digest) and resumed:
        log.info("resumed file failed its hash check; downloading %s again from the start", target.filename)
        part.unlink()
        digest = _fetch_with_retries(url, part, policy)
    if not target.accepts(digest):
        part.unlink(missing_ok=True)
        raise DownloadError(f"SHA-256 mismatch for {url}: expected {target.expected}, got {digest}; the "
                            f"download was deleted. Try again, or use --mirror BASE if the host serves a bad copy")
    os.replace(part, final)
    _remember_verified(final, digest)


def _fetch_with_retries(url: str, part: Path, policy: _Policy) -> str:
    for attempt in range(policy.retries + 1):
        try:
            return _fetch_once(url, part, policy)
        except _Retryable as exc:
            if attempt == policy.retries:
                raise DownloadError(f"could not download {url} after {attempt + 1} attempts ({exc}); "
                                    f"run again to resume, or use --mirror BASE") from None
            wait = policy.backoff * 2 ** attempt
            log.info("%s; retrying in %.1f s (%d/%d)", exc, wait, attempt + 1, policy.retries)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _fetch_once(url: str, part: Path, policy: _Policy) -> str:
    """Append the rest of ``url`` to ``part``; return the SHA-256 of the whole part file."""
    if url.startswith("file:"):
        return _copy_local(url, part)
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=policy.timeout) as response:
            if response.status_code == 416 and offset:
                return _range_not_satisfiable(url, response, part, policy)
            offset = _body_offset(url, response, offset)
            return _stream_into(response, part, offset, policy)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        raise _Retryable(f"connection to {urlparse(url).netloc} failed: {type(exc).__name__}") from None
    except requests.RequestException as exc:
        raise DownloadError(f"cannot download {url}: {exc}") from None


def _range_not_satisfiable(url: str, response: requests.Response, part: Path, policy: _Policy) -> str:
    """A 416 means ``part`` is as long as the file (done) or longer (stale: start over)."""
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    if total == str(part.stat().st_size):
        return _sha256_of(part).hexdigest()
    log.info("server refused to resume %s; starting over", part.name)
    part.unlink()
    return _fetch_once(url, part, policy)


def _body_offset(url: str, response: requests.Response, offset: int) -> int:
    """Where the body goes in the part file: ``offset`` for a matching 206, else 0 (start over)."""
    status = response.status_code
    if status in _RETRY_STATUS:
        raise _Retryable(f"{url} answered HTTP {status}")
    if status in _NOT_THERE_STATUS:
        raise DownloadError(f"{url} answered HTTP {status} ({response.reason}); the file has moved or the "
                            f"host refuses it: point --mirror BASE (or {MIRROR_ENV}) at a copy of the zoo")
    if status >= 400:
        raise DownloadError(f"{url} answered HTTP {status} ({response.reason})")
    if offset and status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
        return offset
    if offset:
        log.info("server ignored the request to resume at byte %d; starting over", offset)
    return 0


def _stream_into(response: requests.Response, part: Path, offset: int, policy: _Policy) -> str:
    digest = _sha256_of(part) if offset else hashlib.sha256()
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else None
    received = offset
    with open(part, "ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name[: -len(".part")], disable=policy.quiet, leave=False) as bar:
        for block in response.iter_content(STREAM_BYTES):
            out.write(block)
            digest.update(block)
            received += len(block)
            bar.update(len(block))
    if total is not None and received < total:
        raise _Retryable(f"connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def _copy_local(url: str, part: Path) -> str:
    source = Path(url2pathname(urlparse(url).path))
    if not source.is_file():
        raise DownloadError(f"{url}: no such file; check the path or the --mirror BASE")
    digest = hashlib.sha256()
    with open(source, "rb") as stream, open(part, "wb") as out:
        for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# files published without a hash (training logs)


def fetch_file(url: str, final: Union[str, Path], *, mirror: Optional[str] = None, offline: Optional[bool] = None,
               quiet: Optional[bool] = None, check=None, retries: Optional[int] = None,
               backoff: Optional[float] = None, timeout: Optional[float] = None) -> Path:
    """``final``, fetched from ``url`` (mirror, retries, lock and atomic rename as :func:`download`)
    unless a file is there already.

    Without a hash nothing can vouch for a file, so one present under its name is used as it is,
    and ``check(path)`` (raising a PspZooError) vets a new download before it takes that name.
    """
    final = Path(final)
    if final.is_file():
        return final
    if _env_flag(OFFLINE_ENV) if offline is None else offline:
        raise DownloadError(f"offline: {final.name} is not in the cache (looked for {final}); fetch it "
                            f"while online, or copy the file there")
    _make_dirs(final)
    with _locked(final):
        if final.is_file():
            return final
        part = _housekeeping(final, ".part")
        part.unlink(missing_ok=True)  # no hash could tell whether an older attempt's bytes still fit
        url = resolve_url(url, mirror)
        log.info("downloading %s to %s", url, final)
        try:
            _fetch_with_retries(url, part, _Policy.make(retries, backoff, timeout, quiet))
            if check is not None:
                check(part)
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    return final
