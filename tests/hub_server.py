"""A local HTTP server that answers like the Hugging Face Hub's file endpoints, for offline tests.

huggingface_hub downloads a file with `HEAD {endpoint}/{repo}/resolve/{revision}/{file}` (reading
X-Repo-Commit, ETag and Content-Length) and then a GET of the same URL. Only loopback is used.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Path]] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _lookup(self) -> tuple[int, Path | None, str]:
                path = unquote(self.path.split("?", 1)[0]).lstrip("/")
                hub.requests.append((self.command, path))
                if "/resolve/" not in path:
                    return 404, None, "RepoNotFound"
                repo, rest = path.split("/resolve/", 1)
                _revision, _, filename = rest.partition("/")
                if repo not in hub.repos:
                    return 404, None, "RepoNotFound"
                file = hub.repos[repo].get(filename)
                if file is None:
                    return 404, None, "EntryNotFound"
                return 200, file, ""

            def _headers(self, status: int, file: Path | None, error: str) -> None:
                self.send_response(status)
                if file is not None:
                    self.send_header("Content-Length", str(file.stat().st_size))
                    self.send_header("ETag", '"' + hashlib.sha256(str(file).encode()).hexdigest() + '"')
                    self.send_header("X-Repo-Commit", COMMIT)
                else:
                    self.send_header("X-Error-Code", error)
                    self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
                self._headers(*self._lookup())

            def do_GET(self) -> None:  # noqa: N802
                status, file, error = self._lookup()
                self._headers(status, file, error)
                if file is not None:
                    with open(file, "rb") as f:
                        while chunk := f.read(1 << 20):
                            self.wfile.write(chunk)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_repo(self, repo_id: str, directory: Path) -> None:
        self.repos[repo_id] = {p.name: p for p in directory.iterdir() if p.is_file()}

    def downloads(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET"]

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
