"""A fake Kaggle API on loopback for the official client: the endpoints `make kaggle-run` calls (dataset status,
blob upload, dataset create/version, kernel push, status, output) and the uploads and downloads they lead to.

kaggle 2.2.4 sends every call to https://api.kaggle.com unless KAGGLE_API_ENVIRONMENT=LOCALHOST, which makes it
http://localhost (port 80; its TEST environment, localhost:7777, is a kagglesdk setting the KaggleApi never passes
on). So the fake listens on a free port of 127.0.0.1 and the client reaches it as an HTTP proxy (HTTP_PROXY, which
requests honours): nothing binds a fixed port, and tests may run side by side. `env()` gives the variables.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

BASE = "http://localhost"


@dataclasses.dataclass
class Kernel:
    """What a push leads to: the statuses the status calls return, in order (the last repeats), the output files
    (name under /kaggle/working -> bytes) and the log; `run` may set them from the pushed script and metadata."""

    statuses: list[str] = dataclasses.field(default_factory=lambda: ["RUNNING", "COMPLETE"])
    failure_message: str = ""
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    log: str = "[]"


class FakeKaggle:
    def __init__(self, user: str = "tester"):
        self.user = user
        self.datasets: dict[str, list[dict]] = {}  # ref -> versions: {file name: bytes}
        self.blobs: dict[str, tuple[str, bytes]] = {}  # token -> (file name, bytes)
        self.pushes: list[dict] = []  # every SaveKernel request's body
        self.bodies: list[bytes] = []  # every request's body, for secrets
        self.kernel: Kernel | None = None
        self.run: Callable[[dict], Kernel] = lambda push: Kernel()
        self.http_errors: dict[str, int] = {}  # method -> an HTTP status to answer with
        self.push_error = ""  # ApiSaveKernelResponse.error (e.g. a full GPU quota)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self.server.server_address[1]}"
        return {"KAGGLE_API_ENVIRONMENT": "LOCALHOST", "HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "",
                "no_proxy": ""}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, method: str, body: dict) -> tuple[int, dict]:
        if method in self.http_errors:
            return self.http_errors[method], {"code": self.http_errors[method], "message": f"{method} refused"}
        ref = f"{body.get('ownerSlug')}/{body.get('datasetSlug') or body.get('slug')}"
        if method == "GetDatasetStatus":
            return (200, {"status": "READY"}) if ref in self.datasets else (404, {"code": 404, "message": "no dataset"})
        if method == "StartBlobUpload":
            token = f"blob{len(self.blobs)}"
            self.blobs[token] = (body["name"], b"")
            return 200, {"token": token, "createUrl": f"{BASE}/upload/{token}"}
        if method in ("CreateDataset", "CreateDatasetVersion"):
            files = dict(self.blobs[file["token"]] for file in body.get("body", body).get("files", []))
            self.datasets.setdefault(ref, []).append(files)
            return 200, {"ref": ref, "url": f"{BASE}/datasets/{ref}", "status": "ok", "error": ""}
        if method == "SaveKernel":
            self.pushes.append(body)
            if self.push_error:
                return 200, {"error": self.push_error}
            self.kernel = self.run(body)
            return 200, {"ref": body["slug"], "url": f"{BASE}/code/{body['slug']}", "versionNumber": len(self.pushes)}
        if method == "GetKernelSessionStatus":
            if self.kernel is None:
                return 404, {"code": 404, "message": "no such kernel"}
            status = self.kernel.statuses.pop(0) if len(self.kernel.statuses) > 1 else self.kernel.statuses[0]
            return 200, {"status": status, "failureMessage": self.kernel.failure_message}
        if method == "ListKernelSessionOutput":
            files = [{"fileName": name, "url": f"{BASE}/output/{name}"} for name in sorted(self.kernel.files)]
            return 200, {"files": files, "log": self.kernel.log}
        return 404, {"code": 404, "message": f"the fake has no {method}"}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, payload: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding") == "chunked":  # the client streams an upload's file
                    data = b""
                    while size := int(self.rfile.readline().strip(), 16):
                        data += self.rfile.read(size + 2)[:-2]
                    self.rfile.readline()
                else:
                    data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.bodies.append(data)
                return data

            def do_POST(self):
                status, payload = fake.answer(urlsplit(self.path).path.rsplit("/", 1)[-1], json.loads(self.body() or b"{}"))
                self.reply(status, json.dumps(payload).encode())

            def do_PUT(self):
                token = urlsplit(self.path).path.rsplit("/", 1)[-1]
                fake.blobs[token] = (fake.blobs[token][0], self.body())
                self.reply(200, b"{}")

            def do_GET(self):
                name = urlsplit(self.path).path.removeprefix("/output/")
                self.reply(200, fake.kernel.files[name], "application/octet-stream")

        return Handler
