"""One adapter file on the Hugging Face Hub: its header and small tensors by range request, or the
whole file through the cache.

Header-only commands (``inspect``, ``check``) on a kohya / LyCORIS / diffusers LoRA file in a Hub
repo read the header with one HTTP range request of the first ~100 kB (as huggingface_hub's
``parse_safetensors_file_metadata`` does; a second one when the header is longer), parsed by the
one header parser (:func:`adapterfmt.storage.header.parse_header`), and each ``alpha`` scalar's few
bytes by more range requests (neighbours read together, several at once). Every request is pinned
to the commit the repo listing resolved to. Commands that need tensor values download the file
with ``hf_hub_download`` (the cache, ``HF_HUB_OFFLINE``, the revision as given). huggingface_hub
is imported only here and in :mod:`adapterfmt.sources.hub_base`, only for Hub ids.
"""

from __future__ import annotations

from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..errors import HeaderError
from ..storage.header import SafetensorsHeader, parse_header

#: The first request of a header: huggingface_hub's choice (97% of headers on the Hub are smaller).
_FIRST_BYTES = 100_001
#: Two byte ranges closer than this are read in one request (cheaper than a round trip).
_GAP_BYTES = 64 << 10
#: Range requests in flight at once.
_WORKERS = 8


@dataclass
class RemoteFile:
    """A file of a Hub repo at one commit: ``repo_id``, repo-relative ``path``, commit ``sha``;
    the bytes from its start that :meth:`read_header` fetched are kept (a small file's scalars
    are there)."""

    repo_id: str
    path: str
    sha: str
    head: bytes = field(default=b"", repr=False, compare=False)

    @property
    def location(self) -> str:
        """How records and errors name the file: ``hf://user/repo@<commit>/<path>``."""
        return f"hf://{self.repo_id}@{self.sha}/{self.path}"

    def fetch(self, start: int, end: int) -> tuple[bytes, int]:
        """Bytes ``start`` to ``end`` (exclusive; fewer at the end of the file) by one range
        request, and the file's size.

        Raises:
            CheckpointNotFoundError: the request failed.
        """
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

        from .hub_base import fetch_error

        url = hf_hub_url(self.repo_id, self.path, revision=self.sha)
        try:
            r = http_backoff(
                "GET", url, headers={**build_hf_headers(), "range": f"bytes={start}-{end - 1}"}, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
            )
            hf_raise_for_status(r)
        except Exception as e:  # huggingface_hub raises many types (404, gated, network)
            raise fetch_error(self.location, e, "adapter path") from None
        body = r.content
        if r.status_code == 200:  # the server sent the whole file
            return body[start:end], len(body)
        total = r.headers.get("content-range", "").rpartition("/")[2]
        if not total.isdigit():
            raise HeaderError("the Hub's answer to a range request gave no file size (Content-Range)", path=self.location)
        return body, int(total)

    def read_header(self) -> SafetensorsHeader:
        """The file's header, parsed and checked as a local file's; tensors carry absolute offsets
        and :attr:`location` as their file.

        Raises:
            HeaderError: a damaged header. CheckpointNotFoundError: the file cannot be fetched.
        """
        first, size = self.fetch(0, _FIRST_BYTES)
        reader = _Sequential(self, first)
        header = parse_header(self.location, size, reader.read)
        self.head = reader.buffer
        return header

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(start, end)`` range, in order: from :attr:`head` when it holds them,
        else by range request; ranges less than 64 KiB apart are read in one request, and up to 8
        requests run at once."""
        spans: list[list[int]] = []
        for start, end in sorted({r for r in ranges if r[1] > len(self.head)}):
            if spans and start - spans[-1][1] <= _GAP_BYTES:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        with ThreadPoolExecutor(max_workers=min(_WORKERS, max(1, len(spans)))) as pool:
            bodies = list(pool.map(lambda s: self.fetch(s[0], s[1])[0], spans))
        firsts = [s[0] for s in spans]
        out = []
        for start, end in ranges:
            if end <= len(self.head):
                out.append(self.head[start:end])
                continue
            i = bisect_right(firsts, start) - 1  # the span that starts at or before this range holds it
            out.append(bodies[i][start - spans[i][0] : end - spans[i][0]])
        return out


class _Sequential:
    """``read(n)`` over a remote file from its start: the first request's bytes, then more by range."""

    def __init__(self, remote: RemoteFile, first: bytes) -> None:
        self.remote, self.buffer, self.pos = remote, first, 0

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buffer):
            more, _ = self.remote.fetch(len(self.buffer), end)
            self.buffer += more
        out = self.buffer[self.pos : end]
        self.pos += len(out)
        return out


def download_file(repo_id: str, path: str, revision: Optional[str]) -> str:
    """``path`` of the repo downloaded through huggingface_hub's cache (``hf_hub_download``); its
    local path. The revision goes as the user gave it, so the cache records the branch or tag and
    a later offline run finds the file.

    Raises:
        CheckpointNotFoundError: the download failed (offline and not cached, no such file, ...).
    """
    from huggingface_hub import hf_hub_download

    from .hub_base import fetch_error

    try:
        return str(hf_hub_download(repo_id, path, revision=revision))
    except Exception as e:  # huggingface_hub raises many types (offline, 404, gated, network)
        raise fetch_error(f"{repo_id}/{path}", e, "adapter path") from None


def cached_file(remote: RemoteFile) -> Optional[str]:
    """The local copy of ``remote`` in huggingface_hub's cache at its commit, if there is one."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(remote.repo_id, remote.path, revision=remote.sha)
    return found if isinstance(found, str) else None


__all__ = ["RemoteFile", "cached_file", "download_file"]
