"""A stand-in for the Hugging Face hub on 127.0.0.1, for ``HF_ENDPOINT``: it answers the routes
``huggingface_hub.snapshot_download`` uses (model info, the file tree, file heads and bodies)
for local directories, by revision, so that the real download path runs in tests."""

import hashlib
import http.server
import json
import os
import threading


class LocalHub:
    """``repos``: repo id -> {revision name: directory}; each revision gets a commit hash of its own.
    ``token``: if set, requests without ``Authorization: Bearer <token>`` are refused as the hub does."""

    def __init__(self, repos: dict[str, dict[str, str]], token: str | None = None):
        self.repos, self.token = repos, token
        self.commits = {name: hashlib.sha1(f"{repo}@{name}".encode()).hexdigest()
                        for repo, revisions in repos.items() for name in revisions}
        self.downloaded: list[str] = []  # files whose bodies were sent, as repo/name
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stop answering: connections are refused from now on."""
        self.server.shutdown()
        self.server.server_close()

    def answer(self, request, body: bool) -> None:
        path = request.path.split("?")[0]
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self.send(request, 401, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/" if api else "/").split("/")
        repo, rest = "/".join(parts[:2]), parts[2:]
        if repo not in self.repos:
            return self.send(request, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
        revision = rest[1] if len(rest) > 1 else "main"
        directory, commit = self.resolve(repo, revision)
        if directory is None:
            return self.send(request, 404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
        files = sorted(os.listdir(directory))
        if api and rest[:1] == ["tree"]:
            tree = [{"type": "file", "path": f, "size": os.path.getsize(os.path.join(directory, f)),
                     "oid": hashlib.sha1(self.read(directory, f)).hexdigest()} for f in files]
            return self.send(request, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        if api:
            info = {"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
            return self.send(request, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        name = "/".join(rest[2:])  # /{repo}/resolve/{revision}/{name}
        if name not in files:
            return self.send(request, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)
        data = self.read(directory, name)
        if body:
            self.downloaded.append(f"{repo}/{name}")
        self.send(request, 200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'},
                  body)

    def resolve(self, repo: str, revision: str) -> tuple[str | None, str | None]:
        for name, directory in self.repos[repo].items():
            if revision in (name, self.commits[name]):
                return directory, self.commits[name]
        return None, None

    @staticmethod
    def read(directory: str, name: str) -> bytes:
        with open(os.path.join(directory, name), "rb") as f:
            return f.read()

    @staticmethod
    def send(request, status: int, data: bytes, headers: dict, body: bool) -> None:
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)
