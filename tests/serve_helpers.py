"""Start a real ``kedit serve`` on a free loopback port, talk to it over HTTP, and always stop it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

READ_KEY = "read-key-for-tests"
WRITE_KEY = "write-key-for-tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(port: int, method: str, path: str, body: Any = None, *, key: str | None = READ_KEY, raw: bytes | None = None,
         timeout: float = 600.0) -> tuple[int, Any]:
    """``(status, parsed JSON body)`` of one request (errors included)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def complete(port: int, prompt: str, max_tokens: int = 8) -> tuple[str, list[int], int]:
    """Greedy completion: ``(text, token ids, kedit_version)``; fails the test on any other status than 200."""
    status, body = call(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0})
    assert status == 200, (status, body)
    choice = body["choices"][0]
    return choice["text"], choice["token_ids"], body["kedit_version"]


def wait_computing(port: int, timeout: float = 600.0) -> dict[str, Any]:
    """Poll ``GET /v1/edits`` until the editing worker reports an edit under way; returns its record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        computing = call(port, "GET", "/v1/edits")[1].get("computing")
        if computing:
            return dict(computing)
        time.sleep(0.05)
    raise AssertionError(f"no edit was under way within {timeout} s")


class Server:
    """A ``kedit serve`` process group; stops itself after ``stop_after`` seconds at the latest."""

    def __init__(self, model: str, history: Path, *, workers: int = 1, stop_after: float = 900.0,
                 extra: tuple[str, ...] = (), log: Path | None = None) -> None:
        self.port = free_port()
        self.history = history
        self.log = log or history.parent / f"serve-{self.port}.log"
        env = {**os.environ, "KEDIT_READ_KEY": READ_KEY, "KEDIT_WRITE_KEY": WRITE_KEY}
        command = [sys.executable, "-c", "import sys; from lightning_kedit.cli import main; sys.exit(main())",
                   "serve", "--model", model, "--port", str(self.port),
                   "--history", str(history), "--workers", str(workers), "--stop-after", str(stop_after),
                   "--threads", "1", *extra]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_ready(self, timeout: float = 900.0) -> Server:
        """Wait for /health; generous: with an empty cache the editing worker first collects key statistics."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"kedit serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if call(self.port, "GET", "/health", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"kedit serve was not ready within {timeout} s:\n{self.log.read_text()}")

    def kill9(self) -> None:
        """SIGKILL to every process of the server at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL to whatever is left of the group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=40)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Clients:
    """Threads sending greedy completions in a bounded loop, recording every response."""

    def __init__(self, port: int, prompts: list[str], *, threads: int = 3, seconds: float = 120.0,
                 max_tokens: int = 8) -> None:
        self.port, self.prompts, self.max_tokens = port, prompts, max_tokens
        self.responses: list[dict[str, Any]] = []
        self.failures: list[tuple[int, Any]] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + seconds
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        n = index
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            prompt = self.prompts[n % len(self.prompts)]
            n += 1
            sent = time.monotonic()
            status, body = call(self.port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": self.max_tokens,
                                                                        "temperature": 0}, timeout=300)
            if status != 200:
                self.failures.append((status, body))
                continue
            self.responses.append({"prompt": prompt, "sent": sent, "tokens": body["choices"][0]["token_ids"],
                                   "version": body["kedit_version"], "worker": body["kedit_worker"]})

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)
