"""Every shell command of README.md, docs/*.md and deploy/README.md, run as written.

Each doc gets a fresh copy of the checkout in a temporary directory, as a new user
has after ``git clone`` and ``make run``: its ``.venv`` is a real virtualenv that sees
this one's packages (so nothing is downloaded), already marked installed, so that
``make run`` serves at once. The doc's ``sh`` and ``console`` blocks then run in
order, each in a shell of its own, as if typed into a new terminal: shell variables
do not carry from one block to the next, files do. How a block runs (in the
background, what it must print) is said by a ``doc-test`` comment above it
(tests/markdown_blocks.py); blocks that cannot run here (Docker, a remote host) say
why they are illustrative.

Two things differ from a terminal, and only these: port 8888 becomes a free port
(``SQUALL_PORT`` and the URLs in the commands), so that this test can run beside a
server on 8888 or beside itself; and ``PYTHONUNBUFFERED=1``, so that a background
client's output shows as it comes, as it does on a terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.markdown_blocks import ROOT, SHELL, Block, blocks, doc_paths

TOOLS = ("bash", "make", "curl", "openssl")
FOREGROUND_TIMEOUT = 60.0
START_TIMEOUT = 30.0
OUTPUT_TIMEOUT = 15.0
_PORT_IN_URL = re.compile(r"\b(127\.0\.0\.1|localhost):8888\b")


def runnable(path: Path) -> list[Block]:
    return [block for block in blocks(path)
            if block.language in SHELL and block.directive.illustrative is None]


DOCS = [path for path in doc_paths() if runnable(path)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def fresh_checkout(target: Path) -> Path:
    """The checkout's files (tracked, and new ones not ignored) copied to ``target``,
    with a ``.venv`` that ``make run`` takes as installed."""
    for name in checkout_files():
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    environment = target / ".venv"
    venv.EnvBuilder(symlinks=True, with_pip=False).create(environment)
    packages = Path(sysconfig.get_paths(vars={"base": str(environment),
                                              "platbase": str(environment)})["purelib"])
    (packages / "squall-doc-tests.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = environment / "bin" / "pip"
    pip.write_text('#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n')
    pip.chmod(0o755)
    for marker in (".installed-run", ".installed-test"):
        (environment / marker).touch()  # newer than pyproject.toml: nothing to install
    return target


def checkout_files() -> list[str]:
    """What a clone holds: git's tracked files and new ones it does not ignore (or,
    outside a git checkout, every file but the environment and caches)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others",
                                 "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        skipped = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache",
                   ".ruff_cache", ".hypothesis", "artifacts"}
        return [str(path.relative_to(ROOT)) for path in ROOT.rglob("*")
                if not skipped.intersection(path.relative_to(ROOT).parts)]
    return list(filter(None, listed.decode().split("\0")))


class Session:
    """The terminals one doc asks for: foreground commands, background ones, servers."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("SQUALL_") and "proxy" not in key.lower()}
        self.env.update({"SQUALL_PORT": str(port), "PYTHONUNBUFFERED": "1",
                         "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        self.background: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.server: subprocess.Popen[bytes] | None = None

    def text(self, command: str) -> str:
        return _PORT_IN_URL.sub(rf"\g<1>:{self.port}", command)

    def run(self, block: Block) -> None:
        directive = block.directive
        if block.language == "console":
            for command, expected in block.transcript():
                output, status = self.foreground(block, command)
                assert status == directive.exit, f"{block.where}: {command}\n{output}"
                assert output.rstrip("\n").splitlines() == [
                    self.text(line) for line in expected], f"{block.where}: {command}"
            return
        if directive.server or directive.background:
            self.start(block)
            return
        output, status = self.foreground(block, block.text)
        assert status == directive.exit, f"{block.where} exited {status}:\n{output}"
        for text in directive.expect:
            assert self.text(text) in output, f"{block.where} did not print {text!r}:\n{output}"
        for text in directive.background_output:
            self.wait_output(block, text)

    def foreground(self, block: Block, command: str) -> tuple[str, int]:
        try:
            done = subprocess.run(["bash", "-e", "-c", self.text(command)], cwd=self.directory,
                                  env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=FOREGROUND_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{block.where} did not finish within {FOREGROUND_TIMEOUT:.0f} s")
        return (done.stdout + done.stderr).decode(errors="replace"), done.returncode

    def start(self, block: Block) -> None:
        if block.directive.server and self.server is not None:
            self.stop(self.server)
        log = self.directory / f".doc-test-{block.line}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(["bash", "-e", "-c", self.text(block.text)],
                                       cwd=self.directory, env=self.env, stdout=sink,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        if block.directive.server:
            self.server = process
            self.wait_healthy(block, process, log)
        else:
            self.background.append((process, log))
            if block.directive.wait_for:
                self.wait_output(block, block.directive.wait_for)

    def wait_healthy(self, block: Block, process: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            assert process.poll() is None, f"{block.where} stopped:\n{log.read_text()}"
            try:
                with opener.open(f"http://127.0.0.1:{self.port}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"{block.where} did not answer /healthz:\n{log.read_text()}")

    def wait_output(self, block: Block, text: str) -> None:
        """Until the latest background block has printed ``text``."""
        assert self.background, f"{block.where}: no background block to read"
        process, log = self.background[-1]
        deadline = time.monotonic() + OUTPUT_TIMEOUT
        while self.text(text) not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline and process.poll() is None, (
                f"{block.where}: the background block never printed {text!r}:\n"
                f"{log.read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if process is self.server:
            self.server = None

    def close(self) -> None:
        for process, _ in reversed(self.background):
            self.stop(process)
        if self.server is not None:
            self.stop(self.server)


@pytest.fixture
def tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        message = f"the doc commands need {', '.join(missing)} on PATH"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture
def session(tmp_path: Path, tools: None) -> Iterator[Session]:
    running = Session(fresh_checkout(tmp_path / "squall"), free_port())
    try:
        yield running
    finally:
        running.close()


@pytest.mark.parametrize("doc", DOCS, ids=[str(path.relative_to(ROOT)) for path in DOCS])
def test_the_commands_of_a_doc_work_as_written(doc: Path, session: Session) -> None:
    for block in runnable(doc):
        session.run(block)


def test_the_copy_serves_its_own_files(session: Session) -> None:
    """The check above tests the docs against the checkout, not against another one."""
    probe = "import run, server; print(run.__file__); print(server.__file__)"
    done = subprocess.run([".venv/bin/python", "-c", probe], cwd=session.directory,
                          capture_output=True, text=True, check=True, env=session.env)
    assert done.stdout.splitlines() == [str(session.directory / "run.py"),
                                        str(session.directory / "server" / "__init__.py")]
    assert sys.prefix != str(session.directory / ".venv")
