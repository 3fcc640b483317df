"""``python run.py token``: development tokens signed with the configured secret."""

from __future__ import annotations

import subprocess
import sys
import time

import jwt
import pytest

from tests.auth_support import SECRET
from tests.server_process import ROOT


def run_py(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True,
                          check=False, text=True, timeout=30, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def claims_of(result: subprocess.CompletedProcess[str], secret: str = SECRET) -> dict:
    assert result.returncode == 0, result.stderr
    issued = result.stdout.strip()
    assert result.stdout.count("\n") == 1 and issued.count(".") == 2
    claims: dict = jwt.decode(issued, secret, algorithms=["HS256"])
    return claims


def test_token_from_the_environment_secret():
    before = time.time()
    claims = claims_of(run_py("token", "--sub", "alice", "--subscribe", "chat.*",
                              "--publish", "chat.*", "--ttl", "3600",
                              env={"SQUALL_JWT_SECRET": SECRET}))
    assert claims["sub"] == "alice"
    assert claims["squall"] == {"subscribe": ["chat.*"], "publish": ["chat.*"]}
    assert before + 3600 - 2 <= claims["exp"] <= time.time() + 3600


def test_token_from_the_flag_and_lists_of_patterns():
    claims = claims_of(run_py("token", "--jwt-secret", SECRET, "--sub", "svc", "--subscribe",
                              "a.>, b.*", "--subscribe", "c", "--ttl", "60"))
    assert claims["squall"] == {"subscribe": ["a.>", "b.*", "c"], "publish": []}
    assert claims["exp"] - claims["iat"] == 60


def test_token_from_the_config_file(tmp_path):
    config = tmp_path / "squall.toml"
    config.write_text(f'jwt_secret = "{SECRET}"\n')
    claims = claims_of(run_py("token", "--config", str(config), "--sub", "bob"))
    assert claims["sub"] == "bob" and claims["exp"] - claims["iat"] == 3600


def test_the_flag_wins_over_the_environment():
    other = "z" * 40
    result = run_py("token", "--jwt-secret", other, "--sub", "a",
                    env={"SQUALL_JWT_SECRET": SECRET})
    assert claims_of(result, other)["sub"] == "a"


@pytest.mark.parametrize(("args", "complaint"), [
    (("--sub", "a"), "no JWT secret"),
    (("--sub", "a", "--jwt-secret", SECRET, "--subscribe", "a..b"), "--subscribe"),
    (("--sub", "a", "--jwt-secret", SECRET, "--publish", ">.x"), "--publish"),
    (("--sub", "a", "--jwt-secret", SECRET, "--ttl", "0"), "--ttl"),
    (("--sub", "a", "--jwt-secret", SECRET, "--ttl", "inf"), "--ttl"),
    (("--sub", "a", "--jwt-secret", SECRET, "--info", '{"n": "' + "x" * 1100 + '"}'), "--info"),
])
def test_token_refuses_with_one_line(args, complaint):
    result = run_py("token", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert complaint in result.stderr and result.stderr.count("\n") == 1
    assert SECRET not in result.stderr


def test_token_info_is_measured_as_the_server_measures_it():
    """Non-ASCII text counts in UTF-8 bytes, as in the server's check (not as escapes)."""
    info = '{"name": "' + "é" * 450 + '"}'  # 900 bytes of UTF-8, 2,700 as \u escapes
    assert claims_of(run_py("token", "--sub", "a", "--jwt-secret", SECRET, "--info", info)
                     )["squall"]["info"] == {"name": "é" * 450}


def test_token_help_and_serve_help_stay_apart():
    token_help = run_py("token", "--help")
    assert token_help.returncode == 0
    for flag in ("--sub", "--subscribe", "--publish", "--ttl", "--jwt-secret", "--config"):
        assert flag in token_help.stdout
    assert "--max-connections" not in token_help.stdout
    serve_help = run_py("--help")
    assert serve_help.returncode == 0
    for flag in ("--api-keys", "--jwt-secret", "--public-topics", "--allowed-origins",
                 "--max-connections", "--max-connections-per-ip", "--frame-rate",
                 "--frame-burst", "--publish-rate", "--publish-burst"):
        assert flag in serve_help.stdout


@pytest.mark.settings(jwt_secret=SECRET)
@pytest.mark.gen_test(timeout=20)
async def test_a_printed_token_opens_a_websocket(ws_connect):
    printed = run_py("token", "--sub", "carol", "--subscribe", "chat.*",
                     env={"SQUALL_JWT_SECRET": SECRET}).stdout.strip()
    client = await ws_connect(query=f"token={printed}")
    assert (await client.subscribe("chat.room"))["topic"] == "chat.room"
    await client.send({"type": "subscribe", "topic": "orders", "ref": 1})
    assert (await client.recv())["code"] == "forbidden"
