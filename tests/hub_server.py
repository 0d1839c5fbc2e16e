"""A real checkpoint host for the download tests: a threaded HTTP server on 127.0.0.1.

It serves the tiny fixture checkpoints under their hashed names, honours ``Range``, and
misbehaves on request: each file has a script of actions consumed one per request (then "ok"):
``"404"``, ``"403"``, ``"410"``, ``"503"``, ``"drop:N"`` (send N bytes of the body, then close),
``"wrong"`` (right length, wrong bytes), ``"ignore_range"`` (always answer 200 with the whole file),
``"stall:N"`` (send N bytes, then wait for ``release`` before sending the rest). Every request is
logged with its Range header, status and the body bytes actually sent. ``also_publish`` serves a
file under a second folder too, as the zoo does for checkpoints listed in two places.
"""
from __future__ import annotations

import collections
import re
import textwrap
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Dict, List, Optional

from psp_zoo.testing import LocalHTTPServer

from helpers import TINY, tiny_checkpoint_path, tiny_info

ZOO_DIR = "/mmsegmentation/v0.5/pspnet/tiny/"
ALT_DIR = "/mmsegmentation/v0.5/pspnet/tiny_again/"
OPENMMLAB = "https://download.openmmlab.com"


@dataclass
class Request:
    path: str
    range: Optional[str]
    status: int
    sent: int = 0


class CheckpointServer:
    def __init__(self) -> None:
        self.files: Dict[str, bytes] = {}
        self.scripts: Dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.log: List[Request] = []
        self.released = threading.Event()
        self.stalled = threading.Event()
        self._httpd = LocalHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.base = self._httpd.start(poll_interval=0.02)
        for tag in TINY:
            self.files[ZOO_DIR + tiny_checkpoint_path(tag).name] = tiny_checkpoint_path(tag).read_bytes()

    def path_of(self, tag: str, folder: str = ZOO_DIR) -> str:
        return folder + tiny_checkpoint_path(tag).name

    def url(self, tag: str, folder: str = ZOO_DIR) -> str:
        return self.base + self.path_of(tag, folder)

    def also_publish(self, tag: str, folder: str = ALT_DIR) -> str:
        """Serve the file of ``tag`` under ``folder`` too; returns its URL there."""
        self.files[self.path_of(tag, folder)] = tiny_checkpoint_path(tag).read_bytes()
        return self.url(tag, folder)

    def script(self, tag: str, *actions: str, folder: str = ZOO_DIR) -> None:
        self.scripts[self.path_of(tag, folder)].extend(actions)

    def requests_for(self, tag: str, folder: str = ZOO_DIR) -> List[Request]:
        return [r for r in self.log if r.path == self.path_of(tag, folder)]

    def close(self) -> None:
        self.released.set()
        self._httpd.stop()


def _handler_for(server: CheckpointServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            script = server.scripts[self.path]
            action = script.popleft() if script else "ok"
            data = server.files.get(self.path)
            if data is None or action in ("404", "403", "410", "503"):
                self._status(404 if data is None else int(action))
                return
            if action == "wrong":
                data = bytes(b ^ 0xFF for b in data)
            start = _range_start(self.headers.get("Range"))
            if action == "ignore_range" or start is None:
                start, status = 0, 200
            elif start >= len(data):
                self._status(416, {"Content-Range": f"bytes */{len(data)}"})
                return
            else:
                status = 206
            self._body(data, start, status, action)

        def _status(self, status: int, headers: Optional[dict] = None) -> None:
            server.log.append(Request(self.path, self.headers.get("Range"), status))
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _body(self, data: bytes, start: int, status: int, action: str) -> None:
            record = Request(self.path, self.headers.get("Range"), status)
            server.log.append(record)
            self.send_response(status)
            self.send_header("Content-Length", str(len(data) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            kind, _, count = action.partition(":")
            cut = start + int(count) if kind in ("drop", "stall") else len(data)
            self._send(data[start:cut], record)
            if kind == "drop":
                self.close_connection = True
                return
            if kind == "stall":
                server.stalled.set()
                server.released.wait(30)
            self._send(data[cut:], record)

        def _send(self, chunk: bytes, record: Request) -> None:
            # counted before writing: the client may have read it all (and the test checked the count)
            # before this thread returns from the write
            record.sent += len(chunk)
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test): expected
                record.sent -= len(chunk)
                self.close_connection = True

    return Handler


def _range_start(header: Optional[str]) -> Optional[int]:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else None


def manifest_text(base: str) -> str:
    """A user manifest listing each tiny fixture checkpoint as ``tiny_<tag>``, hosted at ``base``."""
    entries = []
    for tag in TINY:
        info = tiny_info(tag)
        arch = {k: v for k, v in info["config"].items() if k != "depth"}
        arch_text = ", ".join(f"{k}: {v}" for k, v in arch.items())
        entries.append(textwrap.dedent(f"""\
          - name: tiny_{tag}
            aliases: [tiny-{tag}-alias]
            dataset: cityscapes
            depth: {info['config']['depth']}
            crop_size: [64, 64]
            schedule: 10
            weights: {base}{ZOO_DIR}{info['checkpoint']}
            hash: "{info['sha256'][:8]}"
            sha256: {info['sha256']}
            published: {{mIoU: 1.5}}
            model: {{{arch_text}}}
        """))
    return "models:\n" + "".join(textwrap.indent(e, "  ") for e in entries)


def write_manifest(path: Path, base: str) -> Path:
    path.write_text(manifest_text(base))
    return path
