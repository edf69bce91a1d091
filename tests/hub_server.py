"""A loopback fake of the Hugging Face Hub, just big enough for `create_repo` + `upload_folder`.

Tests point `HF_ENDPOINT` at it so that the real huggingface_hub client code runs end to end
(no mocks of the client) while nothing leaves the machine. It answers the requests that
huggingface_hub 2.x makes for a folder upload, found by reading `hf_api.py`, `_commit_api.py`
and `_upload_pipeline.py`:

- `POST /api/repos/create`                          -> `{"url": ...}`; 409 if it exists (create_repo); a
  name without a namespace is created under the token's user (`FakeHubState.user`), as the Hub does
- `POST /api/validate-yaml`                         -> no errors (README.md metadata check)
- `POST /api/{type}s/{repo}/preupload/{revision}`   -> every file in "regular" mode, so the
  content is sent inline, base64-encoded, in the commit request (no LFS / Xet negotiation)
- `POST /api/{type}s/{repo}/commit/{revision}`      -> NDJSON body: a header line, then one
  `{"key": "file", "value": {"path", "content", "encoding": "base64"}}` line per file

Anything else is answered 404 (and recorded), so a new kind of request shows up in the test
instead of being silently accepted. Every request is recorded (method, path, headers, raw body);
decoded uploaded files are kept per repo.

Written by hand because no maintained test double of the Hub exists on PyPI: huggingface_hub's
own tests run against a staging Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class FakeHubState:
    requests: list[RecordedRequest] = field(default_factory=list)
    repos: dict[str, dict] = field(default_factory=dict)  # repo_id -> create payload
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo_id -> {path: content}
    commits: list[dict] = field(default_factory=list)  # {"repo_id", "revision", "header", "paths"}
    user: str = "user"  # the namespace of a repo created without one (the token's user on the Hub)
    token_role: str = "write"  # what `whoami` says the token may do: "read", "write" or "fineGrained"
    refuse_commits: bool = False  # answer every commit 403, as the Hub does for a repo the token may not write
    lock: threading.Lock = field(default_factory=threading.Lock)


_PREUPLOAD = re.compile(r"^/api/(models|datasets|spaces)/(?P<repo>[^/]+(?:/[^/]+)?)/preupload/(?P<rev>[^/?]+)")
_COMMIT = re.compile(r"^/api/(models|datasets|spaces)/(?P<repo>[^/]+(?:/[^/]+)?)/commit/(?P<rev>[^/?]+)")


def _make_handler(state: FakeHubState, endpoint_ref: list[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep pytest output clean
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            body = self._read_body()
            path = self.path
            with state.lock:
                # header names lower-cased: HTTP/1.1 names are case-insensitive and httpx sends them lower-case
                headers = {k.lower(): v for k, v in self.headers.items()}
                state.requests.append(RecordedRequest(self.command, path, headers, body))
            endpoint = endpoint_ref[0]

            if self.command == "POST" and path.split("?")[0] == "/api/repos/create":
                payload = json.loads(body or b"{}")
                # a name without a namespace goes to the token's user, as on the Hub (this fake's user: `user`)
                repo_id = f"{payload.get('organization') or state.user}/{payload.get('name')}"
                with state.lock:
                    exists = repo_id in state.repos
                    state.repos.setdefault(repo_id, payload)
                    state.files.setdefault(repo_id, {})
                url = f"{endpoint}/{repo_id}"
                if exists:  # as the Hub does; `create_repo(exist_ok=True)` must accept it
                    return self._reply(409, {"error": "You already created this model repo", "url": url})
                return self._reply(200, {"url": url, "name": repo_id, "id": repo_id})

            if self.command == "GET" and path.split("?")[0] == "/api/whoami-v2":  # as the Hub answers for a user token
                return self._reply(200, {"type": "user", "name": state.user,
                                         "auth": {"type": "access_token",
                                                  "accessToken": {"displayName": "test", "role": state.token_role}}})

            if self.command == "POST" and path.split("?")[0] == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})

            match = _PREUPLOAD.match(path)
            if self.command == "POST" and match:
                if match["repo"] not in state.repos:
                    return self._reply(404, {"error": "Repository not found"})
                files = json.loads(body)["files"]
                return self._reply(
                    200,
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                            for f in files
                        ]
                    },
                )

            match = _COMMIT.match(path)
            if self.command == "POST" and match and state.refuse_commits:
                return self._reply(403, {"error": "You don't have the rights to create a commit in this repo"})
            if self.command == "POST" and match:
                repo_id = match["repo"]
                if repo_id not in state.repos:
                    return self._reply(404, {"error": "Repository not found"})
                header, paths = None, []
                for line in body.splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item["key"] == "header":
                        header = item["value"]
                    elif item["key"] == "file":
                        value = item["value"]
                        if value.get("encoding") != "base64":
                            return self._reply(400, {"error": f"unsupported encoding {value.get('encoding')}"})
                        with state.lock:
                            state.files[repo_id][value["path"]] = base64.b64decode(value["content"])
                        paths.append(value["path"])
                    else:  # lfsFile, deletedFile, ...: never asked for by this fake's preupload answer
                        return self._reply(400, {"error": f"unsupported commit operation {item['key']}"})
                oid = hashlib.sha1(body).hexdigest()
                with state.lock:
                    state.commits.append(
                        {"repo_id": repo_id, "revision": match["rev"], "header": header, "paths": paths}
                    )
                return self._reply(200, {"commitUrl": f"{endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})

            return self._reply(404, {"error": f"fake hub: no route for {self.command} {path}"})

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

    return Handler


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 and a free port; use as a context manager.

    `max_seconds` bounds its life: a watchdog shuts it down even if a test forgets to.
    """

    def __init__(self, max_seconds: float = 60.0):
        self.state = FakeHubState()
        self._endpoint_ref = [""]
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self.state, self._endpoint_ref))
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._endpoint_ref[0] = self.endpoint
        self._max_seconds = max_seconds
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._stopped = threading.Event()
        self._watchdog = threading.Thread(target=self._expire, daemon=True)

    def _expire(self) -> None:
        if not self._stopped.wait(self._max_seconds):
            self.stop()

    def start(self) -> "FakeHub":
        self._thread.start()
        self._watchdog.start()
        return self

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python tests/hub_server.py, then HF_ENDPOINT=<printed url>
    with FakeHub(max_seconds=600) as hub:
        print(hub.endpoint, flush=True)
        time.sleep(600)


def cache_snapshot(cache_dir, repo_id: str, folder, revision: str = "main") -> str:
    """Put `folder` into a Hugging Face cache (`cache_dir`) as the snapshot of the model repo `repo_id`, in
    huggingface_hub's own layout (`models--{org}--{name}/refs/{revision}` naming a commit, whose files are
    under `snapshots/{commit}/`), so that the real client code resolves the Hub id offline
    (`HF_HUB_OFFLINE=1`) from that cache: `from_pretrained(repo_id, cache_dir=cache_dir)` runs unchanged
    and any other cache misses it. Returns the snapshot folder."""
    import os
    import shutil

    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = os.path.join(os.fspath(cache_dir), "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", revision), "w") as f:
        f.write(commit)
    snapshot = os.path.join(repo, "snapshots", commit)
    shutil.copytree(os.fspath(folder), snapshot)
    return snapshot
