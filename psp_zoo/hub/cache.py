"""Fetching checkpoint files into a local cache: resume, hash check, locking, mirrors, offline.

Knows no models, only manifest records and URLs. A file lives in the cache under its published
hashed name (``<stem>-<sha256[:8]>.pth``), in ``$PSP_ZOO_HOME`` or else torch.hub's checkpoint
directory, so a copy fetched earlier by torch.hub or mmseg is found and reused once its hash checks
out. Housekeeping (``.part`` files, locks, "already verified" markers) lives in ``.psp-zoo/`` there.

Nothing half-written ever sits under the final name: bytes go to ``.part`` (resumed with an HTTP
Range request after a dropped connection), are hashed while they stream, and only a file whose
SHA-256 matches is moved into place with ``os.replace``.

A file a ``file://`` URL names (a user manifest's local checkpoint, a fine-tuned run's entry that
``psp-zoo train --from`` writes) is used where it is once its hash checks out: never copied into
the cache, hashed again at each use (it lives outside the cache, where anything may change it).

A file with no URL (the PSPNet authors' models) is saved in the cache by hand; without a published
hash, the SHA-256 of the first one loaded is recorded beside it and a later change is warned about.

A checkpoint may be published at several URLs; they are tried in order and the first that serves
a file with the right hash wins. Connection failures that another attempt cannot fix (the host name
does not resolve, the connection is refused) are not retried, and the host is remembered as down
for a few minutes, so the further files of one command fail at once with the same cause instead of
each waiting again. Timeouts, dropped connections and HTTP 5xx are retried with backoff. The
transfer itself is :mod:`psp_zoo.hub.fetching`; this module is the cache and the public functions.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import filelock

from ..constants import HOME_ENV, MANIFEST_ENV, OFFLINE_ENV, env_flag, env_text
from ..errors import DownloadError, PspZooError
from ..files import atomic_write
from ..manifest.loading import Checkpoint, get_checkpoint
from .fetching import (
    Policy,
    Target,
    Unavailable,
    fetch_first_that_serves,
    fetch_with_retries,
    forget_failed_hosts,
    from_live_host,
    give_up,
    housekeeping,
    is_verified,
    marker_matches,
    resolve_url,
    sha256_of,
)

__all__ = ["download", "fetch_file", "cache_dir", "cached_path", "cache_state", "is_cached", "resolve_url",
           "forget_failed_hosts", "first_sha256_record"]

log = logging.getLogger(__name__)


_HASHED_NAME_RE = re.compile(r"-(?P<prefix>[0-9a-f]{8})\.[A-Za-z0-9]+$")
NameOrUrl = Union[str, Checkpoint]
CacheDir = Union[None, str, Path]
ManifestPaths = Union[None, str, Path, Sequence[Union[str, Path]]]  # as psp_zoo.get_manifest takes


# --------------------------------------------------------------------------------------------
# where things are


def cache_dir(path: CacheDir = None) -> Path:
    """The checkpoint cache: ``path``, else ``$PSP_ZOO_HOME``, else ``torch.hub.get_dir()/checkpoints``."""
    # torch.hub and mmseg (via mmengine) save published files here under the same hashed names
    if path is None:
        path = env_text(HOME_ENV) or _torch_hub_dir() / "checkpoints"
    return Path(path).expanduser()


# inside the functions below, ``cache_dir`` is their keyword argument (the folder the caller chose)
_cache_root = cache_dir


def _target(name_or_url: NameOrUrl, manifest: ManifestPaths = None, sha256: Optional[str] = None) -> Target:
    if isinstance(name_or_url, Checkpoint):
        entry = name_or_url
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", name_or_url):
        filename = unquote(urlparse(name_or_url).path.rsplit("/", 1)[-1])
        match = _HASHED_NAME_RE.search(filename)
        if not match and not sha256:
            raise DownloadError(f"cannot verify {name_or_url}: its file name does not end in "
                                f"-<8 hex digits of SHA-256>.pth; pass sha256=<full hash> to download it")
        prefix = match.group("prefix") if match else sha256[:8]
        return Target((name_or_url,), filename, prefix, sha256, label=name_or_url)
    else:
        entry = get_checkpoint(name_or_url, manifest=manifest)
    return Target(tuple(entry.urls), entry.filename, entry.hash_prefix, sha256 or entry.sha256, label=entry.name,
                  download_page=entry.download_page)


def _local_file(target: Target) -> Optional[Path]:
    """The existing file one of ``target``'s ``file://`` URLs names (the first), else None."""
    for url in target.urls:
        if url.startswith("file:"):
            path = Path(url2pathname(urlparse(url).path))
            if path.is_file():
                return path
    return None


def _local_is_verified(path: Path, target: Target) -> bool:
    """A local file's hash, checked at each use: no marker is written beside a file psp-zoo does not own."""
    return target.accepts(sha256_of(path).hexdigest())


def cached_path(name_or_url: NameOrUrl, *, cache_dir: CacheDir = None, manifest: ManifestPaths = None) -> Path:
    """Where the verified file of a checkpoint name, manifest record or URL lives (or would live):
    the local file a ``file://`` URL names, where there is one, else its place in the cache."""
    target = _target(name_or_url, manifest)
    return _local_file(target) or _cache_root(cache_dir) / target.filename


def cache_state(name_or_url: NameOrUrl, *, cache_dir: CacheDir = None, manifest: ManifestPaths = None) -> str:
    """'cached' (verified; a local file a ``file://`` URL names counts), 'corrupt' (wrong hash),
    'partial' (an interrupted download) or 'missing'."""
    target = _target(name_or_url, manifest)
    local = _local_file(target)
    if local is not None and _local_is_verified(local, target):
        return "cached"
    final = _cache_root(cache_dir) / target.filename
    if final.is_file():
        by_hand_unhashed = not target.urls and not target.sha256  # nothing to check it against
        return "cached" if by_hand_unhashed or is_verified(final, target) else "corrupt"
    if local is not None:
        return "corrupt"
    return "partial" if housekeeping(final, ".part").is_file() else "missing"


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
    progress bar, which is only shown on a terminal anyway. Each URL the checkpoint is published
    at is tried in order. Raises DownloadError naming every URL tried and why it failed.

    A file a ``file://`` URL names is returned where it is once its SHA-256 checks out (also
    offline), never copied into the cache.

    An entry with no URL (``download_page``: the PSPNet authors' files) is never downloaded: its
    file is the one the user saved in the cache (DownloadError saying where from and where to when
    it is not there), checked against the entry's sha256 if it has one, else the SHA-256 of the
    first file loaded is recorded (:func:`first_sha256_record`) and a later change warned about.
    """
    target = _target(name_or_url, manifest, sha256)
    local = _local_file(target)
    if local is not None and _local_is_verified(local, target):
        return local
    final = _cache_root(cache_dir) / target.filename
    if not target.urls:
        return _placed_by_hand(final, target)
    if final.is_file() and marker_matches(final, target):
        return final  # the common case: no lock, no hashing
    offline = _offline_from_env() if offline is None else offline
    if offline:
        return _from_cache_only(final, target)
    _make_dirs(final)
    with _locked(final):
        if is_verified(final, target):
            return final  # present already, or fetched by another process while we waited
        try:
            fetch_first_that_serves(target, final, mirror, Policy.make(retries, backoff, timeout, quiet))
        except OSError as exc:  # writing the cache failed: a full disk, a quota; the .part stays to resume
            raise DownloadError(f"cannot write {exc.filename or final}: {exc.strerror or exc}; free some space "
                                f"and run again to resume, or set {HOME_ENV} to another folder") from None
    return final


def _torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch (``list`` and ``info`` start without it):
    ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``. A
    directory set in-process with ``torch.hub.set_dir`` is honoured when torch is loaded."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return Path(torch.hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub"


def _offline_from_env() -> bool:
    try:
        return env_flag(OFFLINE_ENV)
    except PspZooError as exc:
        raise DownloadError(str(exc)) from None


def _from_cache_only(final: Path, target: Target) -> Path:
    if is_verified(final, target):
        return final
    if final.is_file():
        raise DownloadError(f"offline: the cached {final} has the wrong SHA-256 (expected {target.expected}); "
                            f"delete it and run `psp-zoo get {target.label}` while online")
    raise DownloadError(f"offline: {target.filename} is not in the cache (looked for {final}); run "
                        f"`psp-zoo get {target.label}` while online, copy the file there, or set {HOME_ENV}")


def _make_dirs(final: Path) -> None:
    try:
        housekeeping(final, "").parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot write to the cache {final.parent} ({exc.strerror or exc}); "
                            f"set {HOME_ENV} to a writable folder") from None


class _locked:
    """A per-file inter-process lock; says so when another process holds it, then waits."""

    def __init__(self, final: Path):
        self.final, self.lock = final, filelock.FileLock(str(housekeeping(final, ".lock")))

    def __enter__(self):
        try:
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            log.info("waiting for another process downloading %s", self.final.name)
            self.lock.acquire()
        return self

    def __exit__(self, *exc_info):
        self.lock.release()


# --------------------------------------------------------------------------------------------
# files with no download URL (the PSPNet authors' models): placed in the cache by hand


def _placed_by_hand(final: Path, target: Target) -> Path:
    """The file the user put at ``final``; checked against the entry's sha256 if it has one, else
    its SHA-256 is recorded the first time and a later change is warned about."""
    if not final.is_file():
        where = f"download it by hand from {target.download_page} and save it as {final}"
        others = (f"pass checkpoint=FILE, or declare it in a user manifest entry with the file's URL (e.g. on your "
                  f"mirror) and its sha256 (the manifest argument or {MANIFEST_ENV}; see docs/authors_models.md)")
        raise DownloadError(
            f"{target.label} has no download URL (its authors share it on a page with no stable link and "
            f"no published hash): {where}; or {others}",
            cli_hint="on the command line: --checkpoint FILE or --manifest FILE",
            summary=f"no download URL: {where}",
            advice=f"a file with no download URL is saved by hand where said; or {others}")
    if target.sha256:
        if not is_verified(final, target):
            raise DownloadError(f"{final} is not the file of {target.label}: its SHA-256 is not the entry's "
                                f"{target.sha256}; download it again from {target.download_page}")
        return final
    _check_first_sha256(final, target.label)
    return final


def first_sha256_record(final: Path) -> Path:
    """Where the SHA-256 of the file first loaded from ``final`` (a file placed by hand) is recorded."""
    return housekeeping(Path(final), ".first-sha256")


def _check_first_sha256(final: Path, label: str) -> None:
    record = first_sha256_record(final)
    try:
        first = json.loads(record.read_text())
        first = first if isinstance(first, dict) and isinstance(first.get("sha256"), str) else None
    except (OSError, ValueError):
        first = None
    stat = final.stat()
    if first is not None and (first.get("size"), first.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
        return  # the file recorded, untouched since
    digest = sha256_of(final).hexdigest()
    if first is not None and digest != first["sha256"]:
        warnings.warn(f"{final} changed since psp-zoo first loaded it for {label}: its SHA-256 is now {digest}, "
                      f"was {first['sha256']} (recorded {first.get('recorded', '?')}); if you replaced it on "
                      f"purpose, delete {record} to record the new file", stacklevel=3)
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    when = first.get("recorded") if first else now.isoformat(timespec="seconds")
    try:
        atomic_write(record, json.dumps({"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                         "recorded": when}))
    except OSError:  # a read-only shared cache: nothing recorded, nothing to compare with later
        log.info("cannot record the SHA-256 of %s in %s", final, record.parent)
        return
    if first is None:
        log.info("%s: recorded its SHA-256 %s in %s", label, digest, record)


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
    if _offline_from_env() if offline is None else offline:
        raise DownloadError(f"offline: {final.name} is not in the cache (looked for {final}); fetch it "
                            f"while online, or copy the file there")
    _make_dirs(final)
    with _locked(final):
        if final.is_file():
            return final
        part = housekeeping(final, ".part")
        part.unlink(missing_ok=True)  # no hash could tell whether an older attempt's bytes still fit
        url = resolve_url(url, mirror)
        policy = Policy.make(retries, backoff, timeout, quiet)
        try:
            from_live_host(url, final, lambda: fetch_with_retries(url, part, policy))
            if check is not None:
                check(part)
            os.replace(part, final)
        except Unavailable as exc:
            part.unlink(missing_ok=True)
            raise give_up("", final, [(url, exc)], resumable=False) from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    return final
