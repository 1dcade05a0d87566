"""A local fake of the Hugging Face Hub, for download tests that never touch the network.

It serves the routes and headers huggingface_hub really uses for a plain (non-Xet) download:
- `GET /api/models/<repo>[/revision/<rev>]?blobs=true`: model info with `sha` and `siblings`
  (rfilename, size, blobId, lfs {size, sha256, pointerSize});
- `HEAD|GET /<repo>/resolve/<rev>/<file>`: `X-Repo-Commit`, `ETag` (the sha256 for LFS files, the
  git blob id otherwise), `Content-Length`, `Accept-Ranges`, and `Range: bytes=N-` → 206 with
  `Content-Range`;
- errors with `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo).
`cut_once` makes the first full GET of a file stop half-way through its body, once.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from huggingface_hub.utils.sha import git_hash

_LFS_SUFFIXES = (".safetensors", ".npz", ".pt", ".bin")
_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass
class FakeRepo:
    """One repo: its files, its commit, and whether it is gated."""

    files: dict[str, bytes]
    commit: str = field(default_factory=lambda: hashlib.sha1(b"fake-commit").hexdigest())
    gated: bool = False

    def sibling(self, name: str) -> dict[str, object]:
        """The model-info entry of one file, as the Hub lists it with blobs=true."""
        data = self.files[name]
        entry: dict[str, object] = {"rfilename": name, "size": len(data), "blobId": git_hash(data)}
        if name.endswith(_LFS_SUFFIXES):
            entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return entry

    def etag(self, name: str) -> str:
        """What the Hub sends as the file's ETag."""
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if name.endswith(_LFS_SUFFIXES) else git_hash(data)


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 that answers like the Hub for the repos it holds."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.cut_once: set[tuple[str, str]] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """The URL to put in HF_ENDPOINT."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo: str, files: dict[str, bytes], gated: bool = False) -> FakeRepo:
        """Serve these files as `repo`."""
        commit = hashlib.sha1(repo.encode("utf-8")).hexdigest()
        self.repos[repo] = FakeRepo(dict(files), commit, gated)
        return self.repos[repo]

    def add_dir(self, repo: str, directory: Path) -> FakeRepo:
        """Serve every file of a local folder as `repo`."""
        return self.add_repo(
            repo, {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
        )

    def downloads_of(self, repo: str, name: str) -> list[str | None]:
        """The Range header of every GET of one file (None for a full GET)."""
        path = f"/{repo}/resolve/"
        with self._lock:
            return [
                rng
                for method, url, rng in self.requests
                if method == "GET" and url.startswith(path) and url.endswith("/" + name)
            ]

    def record(self, method: str, path: str, range_header: str | None) -> None:
        """Log one request (thread-safe)."""
        with self._lock:
            self.requests.append((method, path, range_header))

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.record(self.command, path, self.headers.get("Range"))
            info = _INFO.match(path)
            if info and body:
                self._model_info(info.group(1), info.group(2) or "main")
                return
            resolve = _RESOLVE.match(path)
            if resolve:
                self._resolve(resolve.group(1), resolve.group(2), resolve.group(3), body)
                return
            self._error(404, "EntryNotFound", f"no route for {path}", body)

        def _repo(self, repo_id: str, revision: str, body: bool) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found", body)
                return None
            if revision not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
                return None
            return repo

        def _model_info(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id, revision, True)
            if repo is None:
                return
            data = {
                "id": repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "siblings": [repo.sibling(name) for name in sorted(repo.files)],
            }
            payload = json.dumps(data).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
            repo = self._repo(repo_id, revision, body)
            if repo is None:
                return
            if repo.gated and not self.headers.get("Authorization"):
                self._error(401, "GatedRepo", "Access to this repo is restricted", body)
                return
            if name not in repo.files:
                self._error(404, "EntryNotFound", f"{name} does not exist", body)
                return
            data = repo.files[name]
            start = _range_start(self.headers.get("Range"))
            partial = start is not None and 0 < start < len(data)
            chunk = data[start:] if partial else data
            self.send_response(206 if partial else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{repo.etag(name)}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(chunk)))
            if partial:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            key = (repo_id, name)
            if not partial and key in hub.cut_once:
                hub.cut_once.discard(key)
                self.wfile.write(chunk[: len(chunk) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(chunk)

        def _error(self, status: int, code: str, message: str, body: bool) -> None:
            payload = json.dumps({"error": message}).encode("utf-8")
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler


def _range_start(header: str | None) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else None
