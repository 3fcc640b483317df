"""A real ``python run.py`` process on an ephemeral port, for tests from the outside."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on http://[^:]+:(\d+)")
_TCP = re.compile(r"TCP line protocol on [^:]+:(\d+)")


def free_port() -> int:
    """A port nothing listens on now (for a server that must come back on the same one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a client scenario on a loop of its own, leaving the thread's current event
    loop alone (``asyncio.run`` unsets it, and later tests would make one implicitly)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


class ServerProcess:
    """Starts ``run.py`` with flags, learns its port from the log, stops it on exit.

    ``restart`` stops it and starts it again on the same port, as an operator would:
    clients that reconnect find it where it was.
    """

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        # the port is read from the "listening" line, logged at info level
        self.flags = ["--port", "0", "--host", "127.0.0.1", "--access-log", "false", *flags,
                      "--log-level", "info"]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.tcp_port = 0  # with --tcp-port: the port it logged
        self.log: list[str] = []
        self._listening = threading.Event()

    def restart(self, timeout: float = 20.0,
                while_down: Callable[[], object] | None = None) -> ServerProcess:
        """Stop (SIGTERM: a graceful shutdown), call ``while_down`` if given, and start
        again on the same port."""
        port = self.port
        self.stop()
        if while_down is not None:
            while_down()
        self.flags[1] = str(port)
        self.port = 0
        self._listening = threading.Event()
        return self.start(timeout)

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *self.flags], cwd=ROOT, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError("server did not start: " + "".join(self.log))
        return self

    def _read_log(self) -> None:
        """Keep draining the server's output, so it never blocks on a full pipe."""
        process, listening = self.process, self._listening
        assert process is not None and process.stdout is not None
        for line in process.stdout:
            self.log.append(line)
            tcp = _TCP.search(line)
            if tcp:
                self.tcp_port = int(tcp.group(1))
            found = _LISTENING.search(line)
            if found and not listening.is_set():
                self.port = int(found.group(1))
                listening.set()
        listening.set()  # exited: stop waiting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def stop(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
