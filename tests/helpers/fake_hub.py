"""A stand-in for the Hugging Face hub on 127.0.0.1, serving model folders from disk: the
requests huggingface_hub makes for `model_info`, `snapshot_download` and file downloads,
so the download path of `urbanseg import` runs here without the network.

    hub = FakeHub({"owner/name": ("<40-hex commit>", folder)})   # serves until hub.close()
    env HF_ENDPOINT=hub.url   # in a new process: huggingface_hub builds its URLs at import
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, tuple[str, Path]]) -> None:
        self.repos = dict(repos)  # repo id -> (commit, folder); may be changed while serving
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def downloads(self) -> list[str]:
        """The files fetched so far (GET .../resolve/...)."""
        return [p.rsplit("/", 1)[-1] for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._answer()

        def do_GET(self) -> None:
            self._answer()

        def _send(self, code: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> None:
            self.send_response(code)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _answer(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                return self._api("/".join(parts[2:4]), parts[4:])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._file("/".join(parts[:2]), "/".join(parts[4:]))
            return self._send(404)

        def _api(self, repo: str, rest: list[str]) -> None:
            if repo not in hub.repos:
                return self._send(404, b'{"error": "Repository not found"}', (("X-Error-Code", "RepoNotFound"),))
            commit, folder = hub.repos[repo]
            files = _files(folder)
            if rest[:1] == ["tree"]:
                body: object = [
                    {
                        "type": "file",
                        "path": str(p.relative_to(folder)),
                        "size": p.stat().st_size,
                        "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                    }
                    for p in files
                ]
            else:
                body = {
                    "id": repo,
                    "modelId": repo,
                    "sha": commit,
                    "private": False,
                    "siblings": [{"rfilename": str(p.relative_to(folder)), "size": p.stat().st_size} for p in files],
                }
            self._send(200, json.dumps(body).encode(), (("Content-Type", "application/json"),))

        def _file(self, repo: str, name: str) -> None:
            commit, folder = hub.repos.get(repo, ("", Path("/nonexistent")))
            f = Path(folder) / name
            if not f.is_file():
                return self._send(404, b"", (("X-Error-Code", "EntryNotFound"),))
            data = f.read_bytes()
            self._send(200, data, (("X-Repo-Commit", commit), ("ETag", f'"{hashlib.sha256(data).hexdigest()}"')))

    return Handler
