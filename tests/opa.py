"""The real OPA server for tests: the binary ``tools/build-opa.sh`` builds, run as ``opa run
--server`` on a free loopback port; and a real HTTP proxy in front of it that can delay or
garble its answers (a slow or broken server, not a fake engine).

Without the binary the tests fail when ``CI`` is set and skip otherwise.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "tools" / "build-opa.sh"


def opa_binary() -> Path:
    """The cached OPA binary; fails under CI, skips locally, when it is not built."""
    override = os.environ.get("GATEWAY_OPA_BIN")
    if override:
        path = Path(override)
    else:
        answer = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "--path"], capture_output=True, text=True, check=True
        )
        path = Path(answer.stdout.strip())
    if path.is_file() and os.access(path, os.X_OK):
        return path
    message = f"the OPA binary {path} is not built: run `make opa-check` (tools/build-opa.sh)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def build_bundle(key: Path, out: Path, *, revision: str | None = None) -> Path:
    """The signed policy bundle, built by tools/build-bundle.sh (the real ``opa build``)."""
    command = ["bash", str(REPO / "tools" / "build-bundle.sh"), "--key", str(key),
               "--out", str(out)]
    if revision is not None:
        command += ["--revision", revision]
    answer = subprocess.run(command, capture_output=True, text=True, check=False)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == str(out)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OpaExited(RuntimeError):
    """``opa run`` stopped before it became healthy; ``log`` is what it wrote."""

    def __init__(self, returncode: int | None, log: str) -> None:
        super().__init__(f"opa exited with {returncode}: {log[-2000:]}")
        self.returncode = returncode
        self.log = log


class OpaServer:
    """``opa run --server`` on a free loopback port, decision logging on (so every decision
    has an id), optionally with a signed bundle it verifies itself. Stopped by :meth:`stop`."""

    def __init__(
        self,
        binary: Path,
        *,
        bundle: Path | None = None,
        verification_key: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            str(binary), "run", "--server", "--addr", f"127.0.0.1:{self.port}",
            "--log-level", "error", "--skip-version-check",
            # Decision ids exist only with decision logging; the console log goes to a file.
            "--set", "decision_logs.console=true",
        ]
        if verification_key is not None:
            command += ["--verification-key", str(verification_key), "--signing-alg", "ES256"]
        if bundle is not None:
            command += ["--bundle", str(bundle)]
        # A file, not a pipe: decision logs would fill a pipe nobody reads and stall OPA.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OpaExited(self.process.returncode, self.log())
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("opa did not become healthy within 20 s")

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self._log.close()


class Proxy:
    """A real HTTP server in front of ``target`` that forwards every request; it can delay
    every answer (``delay_s``), and answer decision requests (``POST /v1/data/...``) with
    ``garbage`` (that body, with status ``garbage_status``) instead. Stopped by :meth:`stop`."""

    def __init__(self, target_port: int) -> None:
        self.delay_s = 0.0
        self.garbage: bytes | None = None
        self.garbage_status = 200
        self._release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                decision = self.command == "POST" and self.path.startswith("/v1/data/")
                if proxy.delay_s:
                    # Slow server (every call, health too): answer only after the delay, or
                    # when the test ends.
                    proxy._release.wait(proxy.delay_s)
                if decision and proxy.garbage is not None:
                    self._send(proxy.garbage_status, proxy.garbage, "application/json")
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=10)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "connection")}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                    self._send(answer.status, payload,
                               answer.getheader("Content-Type") or "application/json")
                except OSError:
                    self._send(502, b'{"code":"bad_gateway"}', "application/json")
                finally:
                    upstream.close()

            def _send(self, status: int, payload: bytes, content_type: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (timed out): nothing to answer

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
