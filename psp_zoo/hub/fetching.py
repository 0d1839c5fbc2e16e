"""Getting one file's bytes from its URLs into a local file, verified: resume, retries, hash check.

The transfer layer under :mod:`psp_zoo.hub`: it knows URLs, files and hashes, no manifest. Bytes
go to ``.part`` (resumed with an HTTP Range request after a dropped connection), are hashed while
they stream, and only a file whose SHA-256 matches is moved into place. Connection failures that
another attempt cannot fix (the host name does not resolve, the connection is refused) are not
retried, and the host is remembered as down for a few minutes; timeouts, dropped connections and
HTTP 5xx are retried with backoff. A failure says what was tried and why, and what to do.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
import urllib3
from tqdm import tqdm

from ..constants import MANIFEST_ENV, MIRROR_ENV, OFFLINE_ENV, env_text
from ..errors import DownloadError

log = logging.getLogger("psp_zoo.hub")  # one logger for everything about fetching

HOUSEKEEPING = ".psp-zoo"  # .part files, locks and "already verified" markers, beside the cached files
OPENMMLAB_PREFIX = "https://download.openmmlab.com/"


def resolve_url(url: str, mirror: Optional[str] = None) -> str:
    """``url`` with the OpenMMLab download host replaced by ``mirror`` (or ``$PSP_ZOO_MIRROR``)."""
    mirror = mirror if mirror is not None else env_text(MIRROR_ENV)
    if mirror and url.startswith(OPENMMLAB_PREFIX):
        return mirror.rstrip("/") + "/" + url[len(OPENMMLAB_PREFIX):]
    return url


DEFAULT_RETRIES = 5        # attempts after the first, on connection errors, timeouts and 5xx
DEFAULT_BACKOFF_S = 1.0    # first wait; doubled after each failed attempt (tests set it near 0)
DEFAULT_TIMEOUT_S = 30.0   # connect and per-read timeout, not a limit on the whole transfer
CHUNK_BYTES = 1 << 20      # for hashing local files
# Network reads: when a connection drops, the block being read is lost, so keep blocks small.
STREAM_BYTES = 1 << 16
# A host that could not be resolved or refused the connection is not asked again for this long:
# long enough for every file of one command, short enough for a notebook whose network comes back.
HOST_DOWN_MEMORY_S = 300.0

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_NOT_THERE_STATUS = {401, 403, 404, 410}



@dataclass(frozen=True)
class Target:
    """One file to fetch: where from, under which name, and the hash it must have."""

    urls: Tuple[str, ...]  # where it is published, tried in order; () for a file downloaded by hand
    filename: str
    hash_prefix: str
    sha256: Optional[str]
    label: str  # what the user asked for, for messages
    download_page: Optional[str] = None  # where people download a file that has no URL

    def accepts(self, digest: str) -> bool:
        return digest.startswith(self.hash_prefix) and (self.sha256 is None or digest == self.sha256)

    @property
    def expected(self) -> str:
        return self.sha256 or f"{self.hash_prefix}..."


class _Retryable(Exception):
    """A failure worth another attempt: connection lost, timeout, 5xx. Its message says which."""


class Unavailable(Exception):
    """This URL did not deliver the file; another URL or a mirror may. ``cause`` is in plain words."""

    def __init__(self, cause: str, hint: Optional[str] = None):
        super().__init__(cause)
        self.cause, self.hint = cause, hint


class _WrongFile(Unavailable):
    """This URL served a file whose SHA-256 is not the entry's."""


class _HostDown(Unavailable):
    """The host itself cannot be reached in a way another attempt will not fix (DNS, refused)."""


class _KnownDown(_HostDown):
    """The host was found down a moment ago, so it was not asked (nothing new to log)."""


def housekeeping(final: Path, suffix: str) -> Path:
    return final.parent / HOUSEKEEPING / (final.name + suffix)


# --------------------------------------------------------------------------------------------
# verifying what is on disk, once


def sha256_of(path: Path, digest=None):
    digest = digest or hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest


def marker_matches(final: Path, target: Target) -> bool:
    """True if ``final`` was hashed before and has not changed since (same size and mtime)."""
    try:
        stat = final.stat()
        mark = json.loads(housekeeping(final, ".verified").read_text())
    except (OSError, ValueError):
        return False
    return (mark.get("size"), mark.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns) \
        and target.accepts(str(mark.get("sha256")))


def _remember_verified(final: Path, digest: str) -> None:
    marker = housekeeping(final, ".verified")
    try:
        stat = final.stat()
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}))
        os.replace(tmp, marker)
    except OSError:  # a read-only shared cache: we just hash again next time
        pass


def is_verified(final: Path, target: Target) -> bool:
    """True if the file is present with the right hash (hashing it only when not remembered)."""
    if not final.is_file():
        return False
    if marker_matches(final, target):
        return True
    digest = sha256_of(final).hexdigest()
    if not target.accepts(digest):
        return False
    _remember_verified(final, digest)
    return True


@dataclass(frozen=True)
class Policy:
    retries: int
    backoff: float
    timeout: float
    quiet: bool

    @classmethod
    def make(cls, retries, backoff, timeout, quiet) -> "Policy":
        return cls(DEFAULT_RETRIES if retries is None else retries,
                   DEFAULT_BACKOFF_S if backoff is None else backoff,
                   DEFAULT_TIMEOUT_S if timeout is None else timeout,
                   bool(quiet) or not sys.stderr.isatty())


# --------------------------------------------------------------------------------------------
# hosts known to be down, for the rest of a command

_HostKey = Tuple[str, str, Optional[int]]
_down_hosts: Dict[_HostKey, Tuple[str, float]] = {}  # key -> (cause, when, by time.monotonic)
_down_lock = threading.Lock()


def forget_failed_hosts() -> None:
    """Ask again hosts that recently failed to resolve or refused connections (e.g. once the network is back)."""
    with _down_lock:
        _down_hosts.clear()


def _host_key(url: str) -> Optional[_HostKey]:
    parts = urlparse(url)
    try:
        port = parts.port
    except ValueError:  # a malformed port: requests will say so
        return None
    if not parts.hostname:
        return None  # file: URLs
    scheme = parts.scheme.lower()
    return scheme, parts.hostname.lower(), port or {"http": 80, "https": 443}.get(scheme)


def _known_down(url: str) -> Optional[str]:
    key = _host_key(url)
    with _down_lock:
        cause, when = _down_hosts.get(key, ("", 0.0)) if key else ("", 0.0)
        if cause and time.monotonic() - when > HOST_DOWN_MEMORY_S:
            del _down_hosts[key]
            return None
    return cause or None


def _remember_down(url: str, cause: str) -> None:
    key = _host_key(url)
    if key:
        with _down_lock:
            _down_hosts[key] = (cause, time.monotonic())


# --------------------------------------------------------------------------------------------
# trying each URL


def fetch_first_that_serves(target: Target, final: Path, mirror: Optional[str], policy: Policy) -> None:
    """Fetch from the first URL (after the mirror rewrite) that serves the file with the right hash."""
    urls = list(dict.fromkeys(resolve_url(url, mirror) for url in target.urls))
    failures: List[Tuple[str, Unavailable]] = []
    for index, url in enumerate(urls):
        try:
            _fetch_from(url, final, target, policy)
            return
        except Unavailable as exc:
            failures.append((url, exc))
            if index + 1 < len(urls) and not isinstance(exc, _KnownDown):
                log.info("%s: %s; trying the next URL", url, exc.cause)
    raise give_up("" if target.label in target.urls else target.label, final, failures)


def _fetch_from(url: str, final: Path, target: Target, policy: Policy) -> None:
    from_live_host(url, final, lambda: _fetch_verified(url, final, target, policy))


def from_live_host(url: str, final: Path, fetch: Callable[[], object]) -> None:
    """``fetch()``, unless the host of ``url`` was found down a moment ago; a host found down is remembered."""
    known = _known_down(url)
    if known:  # the same answer as a moment ago, without waiting for it again
        raise _KnownDown(f"{known} (failed earlier in this process; not tried again)")
    log.info("downloading %s to %s", url, final)
    try:
        fetch()
    except _HostDown as exc:
        _remember_down(url, exc.cause)
        raise


def give_up(label: str, final: Path, failures: List[Tuple[str, Unavailable]],
             resumable: bool = True) -> DownloadError:
    """One line: what was asked for, every URL tried and why it failed, and what to do."""
    what = f" {label}" if label else ""
    if len(failures) == 1:
        tried = f"cannot download{what} from {failures[0][0]}: {failures[0][1].cause}"
    else:
        tried = f"cannot download{what} from any of {len(failures)} URLs: " + "; ".join(
            f"{url} ({exc.cause})" for url, exc in failures)
    hints = (exc.hint if resumable or exc.hint != "run again to resume" else "run again" for _, exc in failures)
    todo = list(dict.fromkeys(hint for hint in hints if hint))
    todo.append(f"set a mirror that serves a copy of the zoo (the mirror argument or {MIRROR_ENV})")
    wrong = [isinstance(exc, _WrongFile) for _, exc in failures]
    if any(wrong):  # offline refuses the served file too: its hash is the one that does not match
        todo.append(f"to use the file the host serves, declare it in a user manifest entry with its sha256 "
                    f"(the manifest argument or {MANIFEST_ENV}; see docs/manifests.md)")
    cli_hint = "on the command line: --mirror BASE" + (", or --manifest FILE" * any(wrong)) + (
        ", or --offline with the file in --cache-dir" * (not all(wrong)))
    offline = "work offline: place the file {} and pass offline=True (or set " + OFFLINE_ENV + "=1)"
    said = [*todo, offline.format(f"at {final}")] if not all(wrong) else todo
    # the same advice for every file of a command (the folder, not this file), for saying it once
    common = [*todo, offline.format(f"in {final.parent}")] if not all(wrong) else todo
    causes = "; ".join(dict.fromkeys(exc.cause for _, exc in failures))
    return DownloadError(f"{tried}; {', '.join(said[:-1])}, or {said[-1]}", cli_hint=cli_hint, summary=causes,
                         advice=f"{', '.join(common[:-1])}, or {common[-1]}")


def _fetch_verified(url: str, final: Path, target: Target, policy: Policy) -> None:
    """Fill ``.part`` (resuming what is there), check its hash, move it into place."""
    part = housekeeping(final, ".part")
    resumed = part.is_file() and part.stat().st_size > 0
    digest = fetch_with_retries(url, part, policy)
    if not target.accepts(digest) and resumed:
        log.info("resumed file failed its hash check; downloading %s again from the start", target.filename)
        part.unlink()
        digest = fetch_with_retries(url, part, policy)
    if not target.accepts(digest):
        part.unlink(missing_ok=True)
        raise _WrongFile(f"SHA-256 mismatch: expected {target.expected}, got {digest}; the download was deleted",
                         hint="try again (the host may serve a bad copy)")
    os.replace(part, final)
    _remember_verified(final, digest)


def fetch_with_retries(url: str, part: Path, policy: Policy) -> str:
    for attempt in range(policy.retries + 1):
        try:
            return _fetch_once(url, part, policy)
        except _Retryable as exc:
            if attempt == policy.retries:
                resumable = part.is_file() and part.stat().st_size > 0
                raise Unavailable(f"gave up after {attempt + 1} attempt{'s' if attempt else ''} (last: {exc})",
                                   hint="run again to resume" if resumable else "run again later") from None
            wait = policy.backoff * 2 ** attempt
            log.info("%s; retrying in %.1f s (%d/%d)", exc, wait, attempt + 1, policy.retries)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _fetch_once(url: str, part: Path, policy: Policy) -> str:
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
        raise _connection_failure(url, exc, policy.timeout) from None
    except requests.RequestException as exc:
        raise Unavailable(f"cannot be requested: {exc}") from None


# --------------------------------------------------------------------------------------------
# saying why a connection failed


def _chain(exc: BaseException) -> List[BaseException]:
    """``exc`` and every exception inside it: causes, contexts, and those requests and urllib3 wrap."""
    seen: List[BaseException] = []
    todo = [exc]
    while todo:
        link = todo.pop(0)
        if link is None or any(link is s for s in seen):
            continue
        seen.append(link)
        inner = [a for a in getattr(link, "args", ()) if isinstance(a, BaseException)]
        todo += inner + [getattr(link, "reason", None), link.__cause__, link.__context__]
    return [link for link in seen if isinstance(link, BaseException)]


def _connection_failure(url: str, exc: BaseException, timeout: float) -> Exception:
    """A _HostDown for what another attempt cannot fix, else a _Retryable; both say why in plain words."""
    parts = urlparse(url)
    host, where = parts.hostname or parts.netloc, parts.netloc
    links = _chain(exc)
    down = None
    if any(isinstance(link, socket.gaierror) for link in links):
        down = f"host {host} could not be resolved (no network or DNS)"
    elif any(isinstance(link, ConnectionRefusedError) for link in links):
        down = f"connection to {where} refused (nothing listens there)"
    elif any(isinstance(link, OSError) and link.errno == errno.ENETUNREACH for link in links):
        down = f"network unreachable for {where} (no network)"
    elif any(isinstance(link, ssl.SSLCertVerificationError) for link in links):
        down = f"the certificate of {host} could not be verified ({_innermost(links)})"
    if down and isinstance(exc, requests.exceptions.ProxyError):
        down = f"the proxy (HTTPS_PROXY / HTTP_PROXY) failed for {where}: {down}"
    if down:
        return _HostDown(down)
    return _Retryable(f"connection to {where} failed: {_transient_cause(exc, links, timeout)}")


def _transient_cause(exc: BaseException, links: List[BaseException], timeout: float) -> str:
    if isinstance(exc, requests.ConnectTimeout):
        return f"no answer within {timeout:g} s while connecting"
    # a timeout while streaming the body reaches us wrapped in a ConnectionError
    if isinstance(exc, requests.Timeout) or any(isinstance(link, (TimeoutError, urllib3.exceptions.TimeoutError))
                                                for link in links):
        return f"no data for {timeout:g} s"
    if any(isinstance(link, ConnectionResetError) for link in links):
        return "connection reset by the host"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection dropped mid-file"
    return _innermost(links)


def _innermost(links: List[BaseException]) -> str:
    """The message of the deepest exception that has one (urllib3's wrappers repeat it verbosely)."""
    for link in reversed(links):
        text = str(link).strip()
        if text:
            return text if len(text) <= 200 else text[:197] + "..."
    return type(links[0]).__name__


def _range_not_satisfiable(url: str, response: requests.Response, part: Path, policy: Policy) -> str:
    """A 416 means ``part`` is as long as the file (done) or longer (stale: start over)."""
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    if total == str(part.stat().st_size):
        return sha256_of(part).hexdigest()
    log.info("server refused to resume %s; starting over", part.name)
    part.unlink()
    return _fetch_once(url, part, policy)


def _body_offset(url: str, response: requests.Response, offset: int) -> int:
    """Where the body goes in the part file: ``offset`` for a matching 206, else 0 (start over)."""
    status = response.status_code
    if status in _RETRY_STATUS:
        raise _Retryable(f"{url} answered HTTP {status} ({response.reason})")
    if status in _NOT_THERE_STATUS:
        raise Unavailable(f"answered HTTP {status} ({response.reason}): the file has moved or the host refuses it")
    if status >= 400:
        raise Unavailable(f"answered HTTP {status} ({response.reason})")
    if offset and status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
        return offset
    if offset:
        log.info("server ignored the request to resume at byte %d; starting over", offset)
    return 0


def _stream_into(response: requests.Response, part: Path, offset: int, policy: Policy) -> str:
    digest = sha256_of(part) if offset else hashlib.sha256()
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
        raise Unavailable(f"no such file ({source})")
    digest = hashlib.sha256()
    with open(source, "rb") as stream, open(part, "wb") as out:
        for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


