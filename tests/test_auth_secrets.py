"""Secrets never show: not in any log line at debug level, not in any response.

A real ``run.py`` process with an API key and a JWT secret is sent right and wrong
keys and tokens, over HTTP and WebSocket, in headers and in URLs; then its whole
output and every answer are searched for each secret string.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.auth_support import API_KEY, OTHER_SECRET, SECRET, token
from tests.server_process import ServerProcess

WRONG_KEY = API_KEY[:-6] + "wrong0"
VALID = token("alice", ["chat.*"], ["chat.*"])
FORGED = token("mallory", [">"], [">"], key=OTHER_SECRET)
EXPIRED = token("alice", ["chat.*"], ttl=-10)
NO_RIGHTS = token("bob")
SECRETS = [SECRET, OTHER_SECRET, API_KEY, WRONG_KEY, VALID, FORGED, EXPIRED, NO_RIGHTS,
           *(credential.rsplit(".", 1)[1] for credential in (VALID, FORGED, EXPIRED, NO_RIGHTS))]


def debug_server(log_format: str) -> ServerProcess:
    server = ServerProcess("--api-keys", API_KEY, "--jwt-secret", SECRET, "--public-topics",
                           "news.>", "--access-log", "true", "--log-format", log_format)
    level = server.flags.index("--log-level") + 1
    server.flags[level] = "debug"  # ServerProcess asks for info; this test wants everything
    return server


def http(server: ServerProcess, path: str, headers: dict[str, str],
         method: str = "POST") -> tuple[int, str]:
    """Status and everything the server answered: headers and body."""
    body = b'{"n": 1}' if method == "POST" else None
    request = urllib.request.Request(server.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, str(response.headers) + response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, str(error.headers) + error.read().decode()


def websocket(server: ServerProcess, query: str, headers: dict[str, str]) -> tuple[Any, str]:
    """The close code (None while open) and every frame and close reason received."""
    url = f"ws://127.0.0.1:{server.port}/v1/ws{query}"
    seen = []
    with connect(url, additional_headers=headers, open_timeout=10) as client:
        try:
            client.send(json.dumps({"type": "subscribe", "topic": "chat.room", "ref": 1}))
            seen.append(str(client.recv(timeout=10)))
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code, closed.rcvd.reason + "".join(seen)
    return None, "".join(seen)


def exercise(server: ServerProcess) -> list[str]:
    """Send right and wrong credentials every way; what came back."""
    answers = []
    for headers, expected in [
        ({"Authorization": f"Bearer {WRONG_KEY}"}, 401),
        ({"Authorization": f"Bearer {API_KEY}"}, 202),
        ({"Authorization": f"Bearer {FORGED}"}, 401),
        ({"Authorization": f"Bearer {EXPIRED}"}, 401),
        ({"Authorization": f"Bearer {NO_RIGHTS}"}, 403),
        ({"Authorization": "Basic " + base64.b64encode(f"u:{SECRET}".encode()).decode()}, 401),
        ({"Authorization": f"{SECRET}"}, 401),
    ]:
        status, answer = http(server, "/v1/topics/news.a/events", headers)
        assert status == expected, (headers, answer)
        answers.append(answer)
    for query, expected in [(f"?token={VALID}", 200), (f"?token={VALID}&since=%FF", 400),
                            # credentials in a URL count for nothing (anonymous may read
                            # news.>), and are masked in the log like tokens
                            (f"?api_key={API_KEY}", 200),
                            (f"?access_token={VALID}&key={SECRET}", 200)]:
        status, answer = http(server, f"/v1/topics/news.a/events{query}", {}, "GET")
        assert status == expected, answer
        answers.append(answer)
    for query in (f"?token={VALID}%FF", f"?token={VALID}&topic=%FF"):
        with pytest.raises(InvalidStatus) as refused:
            websocket(server, query, {})
        assert refused.value.response.status_code == 400
        answers.append(str(refused.value.response.headers) + refused.value.response.body.decode())
    for query, headers, expected in [
        (f"?token={VALID}", {}, None),
        (f"?token={FORGED}&topic=chat.room", {}, 4001),
        (f"?token={EXPIRED}", {}, 4001),
        (f"?token={API_KEY}", {}, 4001),
        ("", {"Authorization": f"Bearer {WRONG_KEY}"}, 4001),
        ("", {"Authorization": f"Bearer {VALID}"}, None),
    ]:
        code, answer = websocket(server, query, headers)
        assert code == expected, (query, answer)
        answers.append(answer)
    return answers


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_in_any_log_line_or_response(log_format):
    server = debug_server(log_format)
    with server:
        answers = exercise(server)
    log = "".join(server.log)
    assert "debug" in log.lower() and "token=***" in log  # verbose, and URLs were logged
    assert log.count(" 401 ") + log.count('"status": 401') >= 5  # the refusals were logged
    for secret in SECRETS:
        assert secret not in log, f"a secret is in the log: {secret[:6]}..."
        for answer in answers:
            assert secret not in answer, f"a secret is in a response: {secret[:6]}..."
