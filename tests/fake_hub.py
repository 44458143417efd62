"""Test helpers: a Hugging Face cache written in the library's on-disk layout, and a local HTTP server on 127.0.0.1
that answers the Hub's file-resolve requests, as huggingface_hub 2.x makes them:

    HEAD /{owner}/{name}/resolve/{revision}/{filename}   -> 200 + X-Repo-Commit, ETag, Content-Length
    GET  (same path)                                     -> the bytes

Errors as the Hub sends them: 401 + ``X-Error-Code: RepoNotFound`` for a missing or private repo without the
token, 404 + ``RevisionNotFound`` / ``EntryNotFound``.
"""
from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


def put_in_cache(cache: Path, repo_id: str, commit: str, files: dict, ref: str | None = "main") -> Path:
    """``models--owner--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<ref>}``."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


class FakeHub:
    def __init__(self):
        self.repos: dict = {}         # repo_id -> {"refs": {...}, "commits": {commit: {file: bytes}}, "token": str}
        self.cut: set = set()         # (repo_id, filename): the GET stops half-way; any later GET of it gets 503
        self.requests: list = []      # (method, path, had Authorization)
        self._cut_done: set = set()
        self._server = None

    def add(self, repo_id: str, commit: str, files: dict, branch: str | None = "main", token: str | None = None):
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "token": token})
        repo["commits"][commit] = dict(files)
        if branch:
            repo["refs"][branch] = commit

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _error(self, status, code, commit=None):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _answer(self, body: bool):
                hub.requests.append((self.command, self.path, "Authorization" in self.headers))
                parts = unquote(self.path.split("?")[0]).lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = hub.repos.get(repo_id)
                if repo is None or (repo["token"] and self.headers.get("Authorization") != f"Bearer {repo['token']}"):
                    return self._error(401, "RepoNotFound")
                commit = repo["refs"].get(revision, revision)
                if commit not in repo["commits"]:
                    return self._error(404, "RevisionNotFound")
                data = repo["commits"][commit].get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", commit)
                cut = (repo_id, filename) in hub.cut
                if body and cut and (repo_id, filename) in hub._cut_done:
                    return self._error(503, "ServiceUnavailable")
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not body:
                    return
                if cut:
                    hub._cut_done.add((repo_id, filename))
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
