"""A tiny Hugging Face Hub on 127.0.0.1 for tests: the endpoints huggingface_hub calls, and a byte count.

Serves, per repo and commit: model info (``/api/models/<id>[/revision/<rev>]``, with ``sha`` and
``siblings``), the recursive tree (``/api/models/<id>/tree/<rev>``), and files
(``/<id>/resolve/<rev>/<path>``: HEAD with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and
for large files ``X-Linked-Size`` / ``X-Linked-Etag``; GET with HTTP ``Range``). A file may be
virtual: a safetensors header followed by a data section of zeros that is never stored, so a
1 GB model costs nothing to build. ``bytes_served`` counts every body byte sent.

huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` when it is imported, so commands run
in a fresh process (:func:`hub_env`, :func:`run_batch`) pointed at the fake Hub and a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import unquote, urlparse

_CHUNK = 1 << 20


@dataclass
class HubFile:
    """``prefix`` bytes followed by ``zeros`` zero bytes (a virtual data section)."""

    prefix: bytes
    zeros: int = 0

    @property
    def size(self) -> int:
        return len(self.prefix) + self.zeros

    @property
    def etag(self) -> str:
        return hashlib.sha1(self.prefix + str(self.zeros).encode()).hexdigest()

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive)."""
        head = self.prefix[start:end]
        tail = max(0, end - max(start, len(self.prefix)))
        return head + b"\0" * tail


def safetensors_file(tensors: Mapping[str, tuple[str, list[int]]]) -> HubFile:
    """A virtual safetensors file: real header, zero data (``{key: (dtype, shape)}``)."""
    from adapterfmt.constants import DTYPE_BITS

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (dtype, shape) in tensors.items():
        n = 1
        for d in shape:
            n *= d
        size = n * DTYPE_BITS[dtype] // 8
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return HubFile(struct.pack("<Q", len(raw)) + raw, offset)


class FakeHub:
    """``with FakeHub() as hub: hub.add(repo, files, sha=..., refs=("main",))``; ``hub.endpoint``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, HubFile]]] = {}  # repo -> sha -> path -> file
        self.refs: dict[str, dict[str, str]] = {}  # repo -> ref -> sha
        self.bytes_served = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None

    def add(self, repo: str, files: Mapping[str, "HubFile | bytes | str"], *, sha: str, refs: tuple[str, ...] = ("main",)) -> None:
        as_files = {p: f if isinstance(f, HubFile) else HubFile(f.encode() if isinstance(f, str) else f) for p, f in files.items()}
        self.repos.setdefault(repo, {})[sha] = as_files
        for ref in refs:
            self.refs.setdefault(repo, {})[ref] = sha

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset_count(self) -> None:
        with self._lock:
            self.bytes_served = 0
            self.requests.clear()

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -----------------------------------------------------------------------------------------

    def _resolve(self, repo: str, rev: str) -> Optional[str]:
        if repo not in self.repos:
            return None
        if rev in self.repos[repo]:
            return rev
        return self.refs.get(repo, {}).get(rev)

    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        with self._lock:
            self.requests.append(f"{'HEAD' if head else 'GET'} {h.path} {h.headers.get('Range', '')}")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._model_info(h, m.group(1), m.group(2) or "main")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            return self._tree(h, m.group(1), m.group(2), m.group(3) or "")
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._file(h, m.group(1), m.group(2), m.group(3), head=head)
        self._send(h, 404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"})

    def _model_info(self, h: BaseHTTPRequestHandler, repo: str, rev: str) -> None:
        sha = self._resolve(repo, rev)
        if sha is None:
            code = "RevisionNotFound" if repo in self.repos else "RepoNotFound"
            return self._send(h, 404, json.dumps({"error": code}).encode(), {"X-Error-Code": code})
        doc = {"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": [{"rfilename": p} for p in sorted(self.repos[repo][sha])]}
        self._send(h, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def _tree(self, h: BaseHTTPRequestHandler, repo: str, rev: str, under: str) -> None:
        sha = self._resolve(repo, rev)
        if sha is None:
            return self._send(h, 404, b'{"error": "RevisionNotFound"}', {"X-Error-Code": "RevisionNotFound"})
        entries = []
        for p, f in sorted(self.repos[repo][sha].items()):
            if under and not p.startswith(under.rstrip("/") + "/"):
                continue
            entry: dict[str, Any] = {"type": "file", "path": p, "size": f.size, "oid": f.etag}
            if p.endswith(".safetensors"):
                entry["lfs"] = {"oid": hashlib.sha256(f.etag.encode()).hexdigest(), "size": f.size, "pointerSize": 134}
            entries.append(entry)
        self._send(h, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

    def _file(self, h: BaseHTTPRequestHandler, repo: str, rev: str, rel: str, *, head: bool) -> None:
        sha = self._resolve(repo, rev)
        f = None if sha is None else self.repos[repo][sha].get(rel)
        if f is None:
            code = "EntryNotFound" if sha is not None else "RevisionNotFound" if repo in self.repos else "RepoNotFound"
            return self._send(h, 404, b"", {"X-Error-Code": code}, head=head)
        etag = f.etag
        lfs = rel.endswith(".safetensors")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if lfs:
            headers.update({"X-Linked-Size": str(f.size), "X-Linked-Etag": f'"{hashlib.sha256(etag.encode()).hexdigest()}"'})
        start, end, status = 0, f.size, 200
        rng = h.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = min(f.size, int(m.group(2)) + 1) if m.group(2) else f.size
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        headers["Content-Length"] = str(end - start)
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if head:
            return
        pos = start
        while pos < end:
            chunk = f.read(pos, min(end, pos + _CHUNK))
            h.wfile.write(chunk)
            with self._lock:
                self.bytes_served += len(chunk)
            pos += len(chunk)

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: Mapping[str, str], *, head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
            with self._lock:
                self.bytes_served += len(body)


def hub_env(hub: FakeHub, cache: Path, *, offline: bool = False) -> dict[str, str]:
    """The environment of a process that talks to ``hub`` (and nothing else) with ``cache`` as its Hub cache."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update(
        HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "home"), HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="30", HF_HUB_DOWNLOAD_TIMEOUT="30",
        NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
    )
    env.pop("ADAPTERFMT_DEBUG", None)
    env.pop("HF_TOKEN", None)
    return env


_BATCH = """
import json, sys
from click.testing import CliRunner
from adapterfmt_cli.main import cli
out = []
for step in json.loads(sys.argv[1]):
    if "cli" in step:
        r = CliRunner().invoke(cli, step["cli"])
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        out.append({"exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "torch": "torch" in sys.modules})
    else:
        scope = {}
        exec(step["code"], scope)
        out.append({"result": scope.get("result"), "torch": "torch" in sys.modules})
print("BATCH " + json.dumps(out))
"""


def run_batch(hub: FakeHub, cache: Path, steps: Sequence[Mapping[str, Any]], *, offline: bool = False) -> list[dict[str, Any]]:
    """Run ``steps`` in order in ONE fresh process against ``hub``: ``{"cli": [args]}`` (the click app,
    in-process: ``exit_code``, ``stdout``, ``stderr``) or ``{"code": "..."}`` (Python that sets
    ``result``, JSON-able); each answer also says whether torch was imported by then (``torch``).
    One process for many commands: the interpreter, huggingface_hub and torch start once."""
    argv = [sys.executable, "-c", _BATCH, json.dumps(list(steps))]
    done = subprocess.run(argv, env=hub_env(hub, cache, offline=offline), capture_output=True, text=True, timeout=300, cwd=cache.parent)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0 and last.startswith("BATCH "), done.stderr[-4000:]
    return json.loads(last[len("BATCH "):])
